package handoff

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"tcpha/handoff/wire"
)

// tlsPort is the rig's FE's TLS port.
const tlsPort = 443

// The FE's held question crosses an authenticated session and pages through
// a BE that holds more flows than one page carries; the BE is asked for the
// FE's VIP port and its TLS port, and answers with both ports' flows.
func TestHeld(t *testing.T) {
	r := newRig(t, "k", "k", 5*time.Second)
	var flows []netip.AddrPort
	for i := range 2*wire.MaxHeldFlows + 10 {
		flows = append(flows, netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 16), byte(i >> 8)}), uint16(i)))
	}
	// The TLS port's: one of its own, one also on the HTTP port (a
	// client port reused across the two).
	tlsOnly := netip.MustParseAddrPort("10.9.9.9:9")
	tlsFlows := []netip.AddrPort{flows[5], tlsOnly}
	asked := make(chan uint16, 10)
	var fail atomic.Bool
	r.receiver.Held = func(port uint16) ([]netip.AddrPort, error) {
		asked <- port
		if fail.Load() {
			return nil, errors.New("dump interrupted")
		}
		if port == tlsPort {
			return tlsFlows, nil
		}
		return flows, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	held, err := r.client.Held(ctx, r.be)
	if err != nil {
		t.Fatal(err)
	}
	if len(held) != len(flows)+1 || !held[flows[0]] || !held[flows[len(flows)-1]] || !held[tlsOnly] {
		t.Errorf("held %d flows (the TLS port's %v: %v), want %d", len(held), tlsOnly, held[tlsOnly], len(flows)+1)
	}
	if len(asked) != 6 {
		t.Errorf("%d listings, want 3 pages of two ports", len(asked))
	}
	for i := 0; len(asked) > 0; i++ {
		if p, want := <-asked, []uint16{vip.Port(), tlsPort}[i%2]; p != want {
			t.Errorf("listing %d: asked for port %d, want %d", i, p, want)
		}
	}
	// A BE that cannot list answers with an error, and the FE decides
	// nothing.
	fail.Store(true)
	if held, err := r.client.Held(ctx, r.be); err == nil || !strings.Contains(err.Error(), "dump interrupted") || held != nil {
		t.Errorf("a failed listing: %v, %v", held, err)
	}
	// A BE without the hook (older) refuses.
	r.receiver.Held = nil
	if _, err := r.client.Held(ctx, r.be); err == nil || !strings.Contains(err.Error(), "unexpected held") {
		t.Errorf("a BE that does not answer: %v", err)
	}
}

func TestHeldPage(t *testing.T) {
	a := netip.MustParseAddrPort("10.0.0.10:1")
	b := netip.MustParseAddrPort("10.0.0.10:2")
	c := netip.MustParseAddrPort("10.0.0.11:1")
	all := []netip.AddrPort{a, b, c}
	for _, tc := range []struct {
		after netip.AddrPort
		want  []netip.AddrPort
	}{
		{netip.AddrPort{}, all},
		{a, []netip.AddrPort{b, c}},
		{netip.MustParseAddrPort("10.0.0.10:1000"), []netip.AddrPort{c}},
		{c, nil},
		{netip.MustParseAddrPort("10.0.0.9:9"), all},
	} {
		got := HeldPage(all, wire.HeldAsk{After: tc.after})
		if got.More || len(got.Flows) != len(tc.want) || (len(tc.want) > 0 && got.Flows[0] != tc.want[0]) {
			t.Errorf("after %v: %+v, want %v", tc.after, got, tc.want)
		}
	}
}
