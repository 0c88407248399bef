package fe

import (
	"net/netip"
	"slices"
	"testing"
)

// A BE's sessions come up one by one: each queues the BE, and the loop
// asks it once for all of them.
func TestHeldAsks(t *testing.T) {
	var h heldAsks
	be1 := netip.MustParseAddrPort("10.0.0.11:666")
	be2 := netip.MustParseAddrPort("10.0.0.12:666")
	for range 3 {
		h.add(be1)
	}
	h.add(be2)
	select {
	case <-h.signal():
	default:
		t.Fatal("no signal")
	}
	got := h.take()
	slices.SortFunc(got, netip.AddrPort.Compare)
	if !slices.Equal(got, []netip.AddrPort{be1, be2}) {
		t.Errorf("take = %v", got)
	}
	if got := h.take(); len(got) != 0 {
		t.Errorf("taken twice: %v", got)
	}
	select {
	case <-h.signal():
		t.Error("a second signal for the same adds")
	default:
	}
}
