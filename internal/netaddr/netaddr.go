// Package netaddr converts the net package's addresses to netip's, the
// one way every package does: an IPv4 socket's address comes back 4-in-6
// mapped from the kernel, and is unmapped here.
package netaddr

import (
	"net"
	"net/netip"
)

// AddrPort is a's address and port, unmapped; the zero value when a is
// not an IP address.
func AddrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	if a == nil {
		return netip.AddrPort{}
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
