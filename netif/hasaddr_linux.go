package netif

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// HasAddr tells whether link holds addr: a standby FE under keepalived
// looks for the VIP this way to know it became the master.
func HasAddr(link netlink.Link, addr netip.Addr) (bool, error) {
	l, err := addrList(link)
	if err != nil {
		return false, fmt.Errorf("list the addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, a := range l {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == addr {
			return true, nil
		}
	}
	return false, nil
}
