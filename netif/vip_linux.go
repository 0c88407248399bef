package netif

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// VIP is a VIP the agent put on an interface. Remove deletes it only if
// the agent added it: an address the operator configured stays.
type VIP struct {
	link  netlink.Link
	addr  *netlink.Addr
	added bool
	// withdrawn is set while Withdraw has taken the address off the
	// interface and Restore has not put it back.
	withdrawn atomic.Bool
}

// addrList retries dumps the kernel interrupted (FACTS.md: vishvananda/
// netlink v1.3.1 returns ErrDumpInterrupted with partial data).
func addrList(link netlink.Link) ([]netlink.Addr, error) {
	var err error
	for range 5 {
		var l []netlink.Addr
		if l, err = netlink.AddrList(link, unix.AF_INET); err == nil {
			return l, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return nil, err
}

// LinkOf returns the interface that holds addr; for an unspecified addr,
// the one the default route leaves through.
func LinkOf(addr netip.Addr) (netlink.Link, error) {
	if !addr.IsValid() || addr.IsUnspecified() {
		routes, err := netlink.RouteGet(net.IPv4(192, 0, 2, 1)) // TEST-NET-1: any off-link address
		if err != nil || len(routes) == 0 {
			return nil, fmt.Errorf("find the interface for the VIP: raddr is 0.0.0.0 and there is no default route (%v): set raddr", err)
		}
		return netlink.LinkByIndex(routes[0].LinkIndex)
	}
	addrs, err := addrList(nil)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == addr {
			return netlink.LinkByIndex(a.LinkIndex)
		}
	}
	return nil, fmt.Errorf("raddr %v is not an address of this host", addr)
}

// vipLabel marks the VIPs tcpha adds (`ip addr` shows it), so an agent
// that restarts after a crash knows the address is tcpha's to remove at a
// clean stop. Labels must start with the interface name and fit IFNAMSIZ.
func vipLabel(link netlink.Link) string {
	l := link.Attrs().Name + ":tcpha"
	if len(l) > 15 {
		return ""
	}
	return l
}

// AddVIP puts vip/32 on link unless it is already there. An address that
// carries tcpha's label counts as added by the agent.
func AddVIP(link netlink.Link, vip netip.Addr) (*VIP, error) {
	label := vipLabel(link)
	a := &netlink.Addr{IPNet: &net.IPNet{IP: vip.AsSlice(), Mask: net.CIDRMask(32, 32)}, Label: label}
	v := &VIP{link: link, addr: a}
	addrs, err := addrList(link)
	if err != nil {
		return nil, fmt.Errorf("list addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, x := range addrs {
		if ip, ok := netip.AddrFromSlice(x.IP); ok && ip.Unmap() == vip {
			v.added = label != "" && x.Label == label
			// The operator's address comes back as it was, should
			// Withdraw take it off.
			a.IPNet, a.Label = x.IPNet, x.Label
			return v, nil
		}
	}
	if err := netlink.AddrAdd(link, a); err != nil {
		return nil, fmt.Errorf("add VIP %v to %s: %w", vip, link.Attrs().Name, err)
	}
	v.added = true
	return v, nil
}

// Remove deletes the VIP if the agent added it. It is idempotent.
func (v *VIP) Remove() error {
	if v == nil || !v.added {
		return nil
	}
	v.added = false
	if err := netlink.AddrDel(v.link, v.addr); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
		return fmt.Errorf("remove VIP %v from %s: %w", v.addr.IP, v.link.Attrs().Name, err)
	}
	return nil
}

// Withdraw takes the VIP off its interface, whoever added it, until
// Restore puts it back: a BE whose ARP filter is gone would answer ARP
// for it (issue 17). Deleting a local IPv4 address leaves the sockets
// bound to it: established connections and VIP:port listeners stay, and
// only stall while it is away (docs/design.md, "A BE without its ARP
// filter"). It reports whether it took the address off now (false when
// it was off already).
func (v *VIP) Withdraw() (bool, error) {
	if v == nil || v.withdrawn.Load() {
		return false, nil
	}
	if err := netlink.AddrDel(v.link, v.addr); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
		return false, fmt.Errorf("withdraw VIP %v from %s: %w", v.addr.IP, v.link.Attrs().Name, err)
	}
	v.withdrawn.Store(true)
	return true, nil
}

// Restore puts back a VIP that Withdraw took off. It is idempotent.
func (v *VIP) Restore() error {
	if v == nil || !v.withdrawn.Load() {
		return nil
	}
	if err := netlink.AddrAdd(v.link, v.addr); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("put VIP %v back on %s: %w", v.addr.IP, v.link.Attrs().Name, err)
	}
	v.withdrawn.Store(false)
	return nil
}

// Withdrawn tells whether Withdraw took the VIP off and Restore has not
// put it back yet.
func (v *VIP) Withdrawn() bool { return v != nil && v.withdrawn.Load() }

// ListenFreebind listens on addr with IP_FREEBIND, so the bind succeeds
// whether or not addr is on an interface yet (ip(7)). A standby FE under
// keepalived listens on the VIP before VRRP gives it the address, and is
// serving the moment it does; the agent that adds the VIP itself binds
// the same way, so there is one path.
func ListenFreebind(ctx context.Context, addr netip.AddrPort) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("set IP_FREEBIND: %w", serr)
		}
		return nil
	}}
	return lc.Listen(ctx, "tcp4", addr.String())
}

// Announce sends a gratuitous ARP for vip from link, so neighbours that
// cached another MAC for it (a previous FE) switch to this one.
func Announce(link netlink.Link, vip netip.Addr) error {
	ifi, err := net.InterfaceByIndex(link.Attrs().Index)
	if err != nil {
		return fmt.Errorf("gratuitous ARP: %w", err)
	}
	c, err := arp.Dial(ifi)
	if err != nil {
		return fmt.Errorf("gratuitous ARP on %s: %w", ifi.Name, err)
	}
	defer c.Close()
	p, err := arp.NewPacket(arp.OperationRequest, ifi.HardwareAddr, vip, ethernet.Broadcast, vip)
	if err != nil {
		return fmt.Errorf("gratuitous ARP: %w", err)
	}
	if err := c.WriteTo(p, ethernet.Broadcast); err != nil {
		return fmt.Errorf("gratuitous ARP on %s: %w", ifi.Name, err)
	}
	return nil
}

// LocalAddrs knows this host's own IPv4 addresses and its subnets'
// broadcast addresses, so a handoff aimed at one is refused. It is read
// once and again every refresh interval: addresses rarely change, and an
// offer must not wait for a netlink dump.
type LocalAddrs struct {
	mu   sync.Mutex
	set  map[netip.Addr]bool
	read time.Time
}

const localAddrsRefresh = 10 * time.Second

// NewLocalAddrs reads this host's addresses.
func NewLocalAddrs() (*LocalAddrs, error) {
	l := &LocalAddrs{}
	if err := l.refresh(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *LocalAddrs) refresh() error {
	addrs, err := addrList(nil)
	if err != nil {
		return fmt.Errorf("list this host's addresses: %w", err)
	}
	set := map[netip.Addr]bool{}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		set[ip.Unmap()] = true
		if a.Broadcast != nil {
			if b, ok := netip.AddrFromSlice(a.Broadcast); ok {
				set[b.Unmap()] = true
			}
		}
	}
	l.mu.Lock()
	l.set, l.read = set, time.Now()
	l.mu.Unlock()
	return nil
}

// Has tells whether a is one of this host's addresses.
func (l *LocalAddrs) Has(a netip.Addr) bool {
	l.mu.Lock()
	stale := time.Since(l.read) > localAddrsRefresh
	if stale {
		l.read = time.Now() // one refresher at a time
	}
	has := l.set[a]
	l.mu.Unlock()
	if stale {
		go l.refresh()
	}
	return has
}
