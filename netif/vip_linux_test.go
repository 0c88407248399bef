package netif

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// A standby FE listens on a VIP that keepalived has not given it yet: the
// bind must succeed for an address on no interface, where a plain bind
// fails with EADDRNOTAVAIL. TEST-NET-1 (RFC 5737) is on no host.
func TestListenFreebind(t *testing.T) {
	addr := netip.MustParseAddrPort("192.0.2.77:0")
	if ln, err := net.Listen("tcp4", addr.String()); err == nil {
		ln.Close()
		t.Fatalf("plain listen on %v succeeded: this host binds non-local addresses (net.ipv4.ip_nonlocal_bind?), the test shows nothing", addr)
	} else if !errors.Is(err, unix.EADDRNOTAVAIL) {
		t.Fatalf("plain listen on %v: %v, want EADDRNOTAVAIL", addr, err)
	}
	ln, err := ListenFreebind(context.Background(), addr)
	if err != nil {
		t.Fatalf("listen with IP_FREEBIND on %v: %v", addr, err)
	}
	defer ln.Close()
	if got := ln.Addr().(*net.TCPAddr).AddrPort().Addr(); got != addr.Addr() {
		t.Errorf("bound to %v, want %v", got, addr.Addr())
	}
}
