package fe

import (
	"maps"
	"net/netip"
	"testing"

	"tcpha/handoff/conntab"
)

// TestCarriedFrom: a reinstall forwards what the connection table says is
// forwarded, and marks closing what is in TIME_WAIT.
func TestCarriedFrom(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.1.1"), netip.MustParseAddr("10.0.1.2")
	flow := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("10.0.9.9"), port) }
	rows := []conntab.Conn{
		{Client: flow(1), State: conntab.Handoffed, BE: be1},
		{Client: flow(2), State: conntab.TimeWait, BE: be2},
		// Its switch is an edit of its own, made after the reinstall.
		{Client: flow(3), State: conntab.Handoffing, BE: be1, Forwarded: true},
		{Client: flow(4), State: conntab.Handoffing},
		// No BE: nothing to forward to.
		{Client: flow(5), State: conntab.Handoffed},
	}
	c := carriedFrom(rows)
	if want := map[netip.AddrPort]netip.Addr{flow(1): be1, flow(2): be2}; !maps.Equal(c.Forward, want) {
		t.Errorf("forward %v, want %v", c.Forward, want)
	}
	if want := map[netip.AddrPort]bool{flow(2): true}; !maps.Equal(c.Closing, want) {
		t.Errorf("closing %v, want %v", c.Closing, want)
	}
	init := c.Init()
	if len(init["forward"]) != 2 || len(init["closing"]) != 1 || len(init["fresh"]) != 0 {
		t.Errorf("init elements %v", init)
	}
}
