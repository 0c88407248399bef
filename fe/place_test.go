package fe

import (
	"errors"
	"maps"
	"net/netip"
	"slices"
	"testing"
	"time"

	"tcpha/backends"
	"tcpha/config"
	"tcpha/handoff/conntab"
	"tcpha/handoff/wire"
	"tcpha/nft"
)

// kernelHolders is the forward map as the moves' look-ups see it.
type kernelHolders map[netip.AddrPort]netip.Addr

func (k kernelHolders) Get(flow netip.AddrPort) (netip.Addr, bool, error) {
	be, ok := k[flow]
	return be, ok, nil
}

func (k kernelHolders) Members(set string) (map[netip.AddrPort]netip.Addr, error) {
	if set == nft.MapForward {
		return k, nil
	}
	return map[netip.AddrPort]netip.Addr{}, nil
}

// With accept = be a BE may move only a connection the kernel forwards to
// it: a move asked by another BE, or for a flow the FE does not forward,
// is refused and leaves no row; the holder's is taken, and its row goes
// once the move has ended (the kernel owns the pin).
func TestMovePinnedOnlyByItsHolder(t *testing.T) {
	f, _, _ := testFE(t, 0)
	f.cfg.Accept = config.AcceptBE
	f.place = newPlacer()
	flow, stranger := netip.MustParseAddrPort("10.0.0.5:40000"), netip.MustParseAddrPort("10.0.0.5:40001")
	f.place.look = kernelHolders{flow: be1}

	if _, err := f.adoptPinned(flow, be2); !errors.Is(err, errNotHolder) {
		t.Errorf("be2 moving be1's flow: %v, want errNotHolder", err)
	}
	if _, err := f.adoptPinned(stranger, be1); !errors.Is(err, conntab.ErrNotForwarded) {
		t.Errorf("moving a flow nobody holds: %v, want ErrNotForwarded", err)
	}
	if n := f.table.Len(); n != 0 {
		t.Fatalf("%d rows after refused moves", n)
	}
	if _, err := f.adoptPinned(flow, be1); err != nil {
		t.Fatalf("be1 moving its flow: %v", err)
	}
	if c, ok := f.table.Get(flow); !ok || c.State != conntab.Handoffed || c.BE != be1 {
		t.Fatalf("row %+v %v, want HANDOFFED to be1", c, ok)
	}
	f.dropMoved(flow, be1)
	if f.table.Len() != 0 {
		t.Error("the row outlived a move that did not happen")
	}
	// A flow that moved keeps its row: a reinstall puts its pin back.
	if _, err := f.adoptPinned(flow, be1); err != nil {
		t.Fatal(err)
	}
	if err := f.table.BeginMove(flow, be1, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := f.table.Handed(flow, be2, time.Now()); err != nil {
		t.Fatal(err)
	}
	f.dropMoved(flow, be1)
	if c, ok := f.table.Get(flow); !ok || c.BE != be2 {
		t.Errorf("the moved flow's row: %+v %v, want kept on be2", c, ok)
	}
	// The port reused by a new connection that the kernel placed on be1:
	// the earlier connection's row (on be2) does not stand in the way.
	if _, err := f.adoptPinned(flow, be1); err != nil {
		t.Errorf("be1 moving a reused port's new connection: %v", err)
	}
	if c := f.mustRow(t, flow); c.BE != be1 {
		t.Errorf("row %+v, want the new connection's on be1", c)
	}
	f.table.DropIf(flow, conntab.Handoffed, f.mustRow(t, flow).Since)
	// A flow without a pin (lost to an upgrade's new table) goes by hash
	// to its slot's BE: that BE holds it.
	f.place.slots[nft.SlotOf(stranger, backends.SlotCount, placeSeed)] = be2
	if _, err := f.adoptPinned(stranger, be1); !errors.Is(err, errNotHolder) {
		t.Errorf("be1 moving an unpinned flow of be2's slot: %v, want errNotHolder", err)
	}
	if _, err := f.adoptPinned(stranger, be2); err != nil {
		t.Errorf("be2 moving an unpinned flow of its slot: %v", err)
	}
}

// The slot map follows the BEs that took the accept = be cluster frame:
// one that refused it (its port held by the web server) gets no slot.
func TestPlacementOnlyAcceptingBEs(t *testing.T) {
	f, flows, _ := testFE(t, 0)
	f.cfg.Accept = config.AcceptBE
	f.place = newPlacer()
	f.place.accepts(be1, true)
	f.place.accepts(be2, false)
	f.updatePlacement(t.Context())
	if got := f.place.slots.Counts(); got[be1] != backends.SlotCount || got[be2] != 0 {
		t.Errorf("slots %v, want all %d on be1", got, backends.SlotCount)
	}
	if !f.place.accepts(be2, true) {
		t.Error("be2's first acceptance is no change")
	}
	f.updatePlacement(t.Context())
	got := f.place.slots.Counts()
	if got[be2] < backends.SlotCount/3 || got[be1]+got[be2] != backends.SlotCount {
		t.Errorf("slots %v after be2 accepts", got)
	}
	flows.mu.Lock()
	n := 0
	for _, c := range flows.calls {
		if c == "exec" {
			n++
		}
	}
	flows.mu.Unlock()
	if n != 2 {
		t.Errorf("%d table edits, want 2", n)
	}
}

// A BE-to-BE move's switch is taken only from the BE that holds the flow,
// and only to a BE that takes connections; a refused one leaves the
// forwarding as it was. With accept = fe the table says who holds it.
func TestSwitchOnlyFromHolder(t *testing.T) {
	f, flows, _ := testFE(t, 0)
	var mover Mover = &fakeMover{}
	f.mover.Store(&mover)
	flow := netip.MustParseAddrPort("10.0.0.5:40000")
	if err := f.table.Begin(flow, time.Now()); err != nil {
		t.Fatal(err)
	}
	if _, err := f.table.Handed(flow, be1, time.Now()); err != nil {
		t.Fatal(err)
	}
	frame := func(to netip.Addr) wire.Frame {
		p, err := wire.Switch{Client: flow, To: to}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return wire.Frame{Type: wire.TypeSwitch, Payload: p}
	}
	if res, why := f.switchFlow(be2, frame(be2)); res != wire.ResultInvalid {
		t.Errorf("a switch to the asker itself: %v %s", res, why)
	}
	if res, why := f.switchFlow(be2, frame(be1)); res != wire.ResultUnknown {
		t.Errorf("be2 switching be1's flow to be1: %v %s", res, why)
	}
	other := netip.MustParseAddr("10.0.0.13")
	if res, _ := f.switchFlow(be1, frame(other)); res != wire.ResultInvalid {
		t.Errorf("a switch to an unknown BE: %v", res)
	}
	stranger := netip.MustParseAddr("10.0.0.99")
	if res, _ := f.switchFlow(stranger, frame(be2)); res != wire.ResultUnknown {
		t.Errorf("a switch from a BE that does not hold the flow: %v", res)
	}
	if c, _ := f.table.Get(flow); c.BE != be1 || c.State != conntab.Handoffed {
		t.Fatalf("after refused switches: %+v", c)
	}
	flows.mu.Lock()
	refusedCalls := len(flows.calls)
	flows.mu.Unlock()
	if refusedCalls != 0 {
		t.Errorf("refused switches edited the kernel: %q", flows.calls)
	}
	if res, why := f.switchFlow(be1, frame(be2)); res != wire.ResultOK {
		t.Fatalf("be1 switching its flow to be2: %v %s", res, why)
	}
	if c, _ := f.table.Get(flow); c.BE != be2 || c.State != conntab.Handoffed {
		t.Errorf("after the switch: %+v", c)
	}
	// The same switch asked again (the BE's FE died before answering, and
	// it asks every FE again) is answered OK without a second edit; one
	// from the BE the flow went to, back to where it was, is not a retry.
	flows.mu.Lock()
	edits := len(flows.calls)
	flows.mu.Unlock()
	if res, why := f.switchFlow(be1, frame(be2)); res != wire.ResultOK {
		t.Errorf("be1's switch to be2 asked again: %v %s", res, why)
	}
	flows.mu.Lock()
	again := len(flows.calls) - edits
	flows.mu.Unlock()
	if again != 0 {
		t.Errorf("the switch asked again edited the kernel %d times", again)
	}
	if res, _ := f.switchFlow(stranger, frame(be1)); res != wire.ResultUnknown {
		t.Errorf("a BE switching a flow it does not hold: %v", res)
	}
	// While the table goes to a successor, a switch is answered busy, and
	// the BE asks again.
	f.mover.Store(nil)
	if res, _ := f.switchFlow(be2, frame(be1)); res != wire.ResultBusy {
		t.Errorf("a switch during a handover: %v, want busy", res)
	}
}

func (f *FE) mustRow(t *testing.T, flow netip.AddrPort) conntab.Conn {
	t.Helper()
	c, ok := f.table.Get(flow)
	if !ok {
		t.Fatalf("no row for %v", flow)
	}
	return c
}

// pinSets is the kernel's forward map and closing set, as a stopping FE's
// drain reads them.
type pinSets map[string]map[netip.AddrPort]netip.Addr

func (p pinSets) Get(flow netip.AddrPort) (netip.Addr, bool, error) {
	be, ok := p[nft.MapForward][flow]
	return be, ok, nil
}

func (p pinSets) Members(set string) (map[netip.AddrPort]netip.Addr, error) {
	return maps.Clone(p[set]), nil
}

// With accept = be a stopping FE drains the connections the kernel
// forwards whose client has not closed, placed or moved, and resets those
// left: not a moved flow's row, which outlives its connection while its
// pin lasts. Waiting on rows made a stop wait out the whole drain after any
// move (a test cluster's FE was killed 10 s after SIGTERM), and never for
// placed connections.
func TestDrainWaitsForLivePins(t *testing.T) {
	f, _, peers := testFE(t, 0)
	f.cfg.Accept = config.AcceptBE
	f.place = newPlacer()
	placed, closed, moved := netip.MustParseAddrPort("10.0.0.5:40000"), netip.MustParseAddrPort("10.0.0.5:40001"),
		netip.MustParseAddrPort("10.0.0.5:40002")
	sets := pinSets{nft.MapForward: {closed: be2}, nft.SetClosing: {closed: be2}}
	f.place.look = sets
	// A moved flow whose connection ended: its row stays while its pin
	// lasts (keepPins), but the kernel's map no longer has it live.
	f.table.Adopt(moved, be1, conntab.Handoffed, time.Now(), time.Time{})
	start := time.Now()
	f.Drain(time.Minute)
	if took := time.Since(start); took > time.Second {
		t.Errorf("with only closed pins and a moved flow's row the drain waited %v", took)
	}
	if len(peers.resets) != 0 {
		t.Errorf("resets %v, want none", peers.resets)
	}

	sets[nft.MapForward][placed] = be1 // a placed connection, still open
	start = time.Now()
	f.Drain(300 * time.Millisecond)
	if took := time.Since(start); took < 300*time.Millisecond {
		t.Errorf("the drain waited %v for a live placed connection, want its whole 300 ms", took)
	}
	want := []reset{{BE: netip.AddrPortFrom(be1, 666), Client: placed}}
	if !slices.Equal(peers.resets, want) {
		t.Errorf("resets %v, want %v", peers.resets, want)
	}
}
