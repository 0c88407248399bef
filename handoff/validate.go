package handoff

import (
	"errors"
	"fmt"
	"net/netip"

	"tcpha/handoff/wire"
)

// CheckClient refuses a handoff whose client no real client can be: the
// rebuilt socket would send from the VIP to wherever the offer says, so an
// offer must not aim it at the VIP, this host, a loopback, multicast or
// broadcast address, or port 0. local reports this host's own addresses
// (and its subnets' broadcast addresses). It also refuses a send queue with
// data: an FE hands off before it answers anything, and a BE migrates only
// once the client acknowledged every byte (seed 4.8.2), so nothing may leave
// a rebuilt socket that the client has not already been sent.
func CheckClient(ci *wire.ConnInfo, vip netip.Addr, local func(netip.Addr) bool) error {
	a := ci.Client.Addr()
	switch {
	case !a.Is4():
		return fmt.Errorf("client %v: not an IPv4 address", ci.Client)
	case ci.Client.Port() == 0:
		return fmt.Errorf("client %v: port 0", ci.Client)
	case a.IsUnspecified() || a.As4()[0] == 0:
		return fmt.Errorf("client %v: a \"this network\" address (0.0.0.0/8)", ci.Client)
	case a.IsLoopback():
		return fmt.Errorf("client %v: a loopback address", ci.Client)
	case a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) || a.As4()[0] >= 240:
		return fmt.Errorf("client %v: not a unicast address", ci.Client)
	case a == vip:
		return fmt.Errorf("client %v: the VIP itself", ci.Client)
	case local != nil && local(a):
		return fmt.Errorf("client %v: an address of this host", ci.Client)
	case len(ci.SendQueue) > 0:
		return errors.New("send queue not empty: only connections with nothing unacknowledged are handed off")
	}
	return nil
}
