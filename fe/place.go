package fe

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"

	"tcpha/backends"
	"tcpha/config"
	"tcpha/handoff/conntab"
	"tcpha/nft"
)

// With [fe] accept = be (issue 14) the FE reads no connection: its packet
// path places each new flow on a BE by hash (nft.FEPlace), the BE accepts
// it on VIP:port, reads and routes its request, and asks the FE to move
// it when it is another BE's. What the agent does is keep the slot map in
// step with the BEs that take new connections, and carry out moves.

// placeSeed is the placing hash's seed. Every FE uses the same, so that a
// client's flows hash alike whichever FE holds the VIP; it must not be 0
// (nft.Placement).
const placeSeed = 0x7c4a1f3b

// placer is the state of the FE's placement.
type placer struct {
	mu sync.Mutex
	// slots is the slot map as installed; chains the BEs with chains.
	slots  backends.SlotTable
	chains map[netip.Addr]bool
	// accepting are the BEs that took the last cluster frame, which told
	// them to accept on VIP:port: only those get slots.
	accepting map[netip.Addr]bool
	// shape is the table's shape for its guard, as of the last edit.
	shape atomic.Pointer[nft.Shape]
	// lookMu guards look, a reader of the forward map for the moves' check
	// of who holds a flow.
	lookMu sync.Mutex
	look   holders
}

// holders looks up which BE the kernel forwards a flow to, and lists the
// pinned flows (nft.Reader).
type holders interface {
	Get(flow netip.AddrPort) (netip.Addr, bool, error)
	Members(set string) (map[netip.AddrPort]netip.Addr, error)
}

// livePins lists the kernel's pins, with accept = be, whose client has not
// closed (in fwd, not in closing), as connections to the BE each is
// forwarded to, in client order.
func livePins(fwd, closing map[netip.AddrPort]netip.Addr) []conntab.Conn {
	out := make([]conntab.Conn, 0, len(fwd))
	for flow, be := range fwd {
		if _, ok := closing[flow]; !ok {
			out = append(out, conntab.Conn{Client: flow, BE: be, State: conntab.Handoffed})
		}
	}
	slices.SortFunc(out, func(a, b conntab.Conn) int { return a.Client.Compare(b.Client) })
	return out
}

// livePins reads the kernel's live pins (livePins).
func (p *placer) livePins() ([]conntab.Conn, error) {
	m, err := p.members(nft.MapForward, nft.SetClosing)
	if err != nil {
		return nil, err
	}
	return livePins(m[0], m[1]), nil
}

// members reads the named sets and maps of the FE's table, one listing
// each, under the reader's lock.
func (p *placer) members(names ...string) ([]map[netip.AddrPort]netip.Addr, error) {
	p.lookMu.Lock()
	defer p.lookMu.Unlock()
	if p.look == nil {
		return nil, errors.New("no reader of the forward map")
	}
	out := make([]map[netip.AddrPort]netip.Addr, len(names))
	for i, name := range names {
		m, err := p.look.Members(name)
		if err != nil {
			return nil, err
		}
		out[i] = m
	}
	return out, nil
}

// pinnedRows are the flows the kernel forwards with accept = be, as
// `tcphactl conns` shows them: TIME_WAIT once the client sent a FIN or
// RST, HANDOFFED once it sent a request, PINNED before. The kernel keeps
// no age. A listing may miss a flow edited meanwhile (nft.Reader).
func (p *placer) pinnedRows() ([]connRow, error) {
	m, err := p.members(nft.MapForward, nft.SetClosing, nft.SetAlive)
	if err != nil {
		return nil, err
	}
	fwd, closing, alive := m[0], m[1], m[2]
	out := make([]connRow, 0, len(fwd))
	for flow, be := range fwd {
		state := "PINNED"
		if _, ok := alive[flow]; ok {
			state = conntab.Handoffed.String()
		}
		if _, ok := closing[flow]; ok {
			state = conntab.TimeWait.String()
		}
		out = append(out, connRow{Client: flow.Addr().String(), ClientPort: flow.Port(), BE: be.String(), State: state})
	}
	slices.SortFunc(out, func(a, b connRow) int {
		if c := netip.MustParseAddr(a.Client).Compare(netip.MustParseAddr(b.Client)); c != 0 {
			return c
		}
		return int(a.ClientPort) - int(b.ClientPort)
	})
	return out, nil
}

func newPlacer() *placer {
	return &placer{slots: make(backends.SlotTable, backends.SlotCount), chains: map[netip.Addr]bool{},
		accepting: map[netip.Addr]bool{}}
}

// accepts records whether be took the cluster frame that tells it to
// accept, and says whether that changed.
func (p *placer) accepts(be netip.Addr, ok bool) (changed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	changed = p.accepting[be] != ok
	p.accepting[be] = ok
	return changed
}

// empty tells whether no slot has a BE.
func (p *placer) empty() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return !slices.ContainsFunc(p.slots, netip.Addr.IsValid)
}

// adopt takes a predecessor's slot map: its BEs are taken to accept.
func (p *placer) adopt(slots map[uint32]netip.Addr) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for slot, be := range slots {
		if int(slot) < len(p.slots) {
			p.slots[slot] = be
			p.accepting[be] = true
		}
	}
}

// slotBE is the BE an unpinned flow's packets go to: its slot's.
func (p *placer) slotBE(flow netip.AddrPort) (netip.Addr, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	be := p.slots[nft.SlotOf(flow, backends.SlotCount, placeSeed)]
	return be, be.IsValid()
}

// holder returns the BE the kernel forwards flow to now.
func (p *placer) holder(flow netip.AddrPort) (netip.Addr, bool, error) {
	p.lookMu.Lock()
	defer p.lookMu.Unlock()
	return p.look.Get(flow)
}

// placement is the placing table's parameters: chains for every BE known
// now, and the slots as installed.
func (f *FE) placement() nft.Placement {
	pl := nft.Placement{Modulus: backends.SlotCount, Seed: placeSeed, PinTimeout: f.cfg.PinTimeout}
	for _, srv := range f.sched.Servers() {
		pl.BEs = append(pl.BEs, srv.Addr)
	}
	if f.place != nil {
		f.place.mu.Lock()
		pl.Slots = slices.Clone(f.place.slots)
		for be := range f.place.chains {
			if !slices.Contains(pl.BEs, be) {
				pl.BEs = append(pl.BEs, be)
			}
		}
		// A slot jumps to its BE's chain, which must exist.
		for _, be := range pl.Slots {
			if be.IsValid() && !slices.Contains(pl.BEs, be) {
				pl.BEs = append(pl.BEs, be)
			}
		}
		f.place.mu.Unlock()
	}
	return pl
}

// installPlace installs the placing table, carrying the flows of a
// predecessor's table (an upgrade): the kernel keeps forwarding them.
func (f *FE) installPlace(c *nftables.Conn, carried *nft.Carried) (*nft.Ruleset, error) {
	if f.place.empty() {
		// An upgrade: the predecessor's slot map goes on, so that a SYN
		// between the two agents is placed, not dropped. Its BEs took the
		// predecessor's cluster frame; the first frame from this agent
		// settles the map again.
		slots, err := nft.ReadSlots(c, nft.FE(nft.FEParams{}).Table)
		if err != nil {
			return nil, err
		}
		f.place.adopt(slots)
	}
	pl := f.placement()
	rs := nft.FEPlace(f.tableParams(), pl)
	if carried != nil {
		for k, v := range carried.Init() {
			if k == nft.MapForward || k == nft.SetClosing {
				rs.Init[k] = append(rs.Init[k], v...)
			}
		}
	}
	if err := nft.Apply(c, rs); err != nil {
		return nil, err
	}
	f.place.mu.Lock()
	for _, be := range pl.BEs {
		f.place.chains[be] = true
	}
	f.place.mu.Unlock()
	shape := nft.ShapeOf(rs)
	f.place.shape.Store(&shape)
	return rs, nil
}

// updatePlacement brings the slot map in step with the BEs that take new
// connections now (available, not draining, weight > 0, and accepting on
// VIP:port), in one transaction through the flow owner. A BE that left
// loses its slots, and only its own (backends.Slots).
func (f *FE) updatePlacement(ctx context.Context) {
	p := f.place
	p.mu.Lock()
	var bes []backends.SlotBE
	for _, b := range f.sched.Placement() {
		if p.accepting[b.Addr] {
			bes = append(bes, b)
		}
	}
	want := backends.Slots(bes)
	if len(bes) == 0 {
		want = make(backends.SlotTable, backends.SlotCount)
	}
	changes := want.Diff(p.slots)
	var add []netip.Addr
	for _, b := range bes {
		if !p.chains[b.Addr] {
			add = append(add, b.Addr)
		}
	}
	p.mu.Unlock()
	if len(changes) == 0 && len(add) == 0 {
		return
	}
	edits := make([]nft.SlotEdit, len(changes))
	for i, ch := range changes {
		edits[i] = nft.SlotEdit{Slot: ch.Slot, From: ch.From, To: ch.To}
	}
	pl := f.placement()
	err := f.flows.Exec(ctx, func(c *nftables.Conn, rs *nft.Ruleset) error {
		if err := nft.EditPlacement(c, rs, f.tableParams(), pl, add, edits); err != nil {
			return err
		}
		shape := nft.ShapeOf(rs)
		p.shape.Store(&shape)
		return nil
	})
	if err != nil {
		f.log.Error("placement not changed", "op", "place", "err", err)
		return
	}
	p.mu.Lock()
	p.slots = want
	for _, be := range add {
		p.chains[be] = true
	}
	p.mu.Unlock()
	counts := want.Counts()
	per := make([]string, 0, len(counts))
	for _, be := range slices.SortedFunc(maps.Keys(counts), netip.Addr.Compare) {
		per = append(per, fmt.Sprintf("%v=%d", be, counts[be]))
	}
	f.log.Info("placement changed", "op", "place", "slots_moved", len(changes), "slots", per)
}

// adoptPinned takes a flow the packet path placed, which the connection
// table does not know, into the table as HANDOFFED to from, if the kernel
// forwards it to from: a BE may move only the connections it holds. It
// returns the row's instance, for dropping the row after the move.
func (f *FE) adoptPinned(flow netip.AddrPort, from netip.Addr) (time.Time, error) {
	// The kernel is the judge, not a row: a moved flow's row outlives its
	// connection while the pin lasts, and a client reusing the port may
	// since have been placed on another BE.
	be, ok, err := f.place.holder(flow)
	if err == nil && !ok {
		// Not pinned (its pin was lost to an upgrade's or a flush's new
		// table, or a full map): the packet path forwards it by hash, to
		// its slot's BE.
		be, ok = f.place.slotBE(flow)
	}
	switch {
	case err != nil:
		return time.Time{}, err
	case !ok:
		return time.Time{}, fmt.Errorf("%w: %v is not forwarded", conntab.ErrNotForwarded, flow)
	case be != from:
		return time.Time{}, fmt.Errorf("%w: %v is forwarded to %v, not to %v", errNotHolder, flow, be, from)
	}
	if c, ok := f.table.Get(flow); ok {
		switch {
		case c.State == conntab.Handoffed && c.BE == from:
			return c.Since, nil // the row agrees
		case c.State == conntab.Handoffing && time.Since(c.Since) < moveWithin:
			return time.Time{}, fmt.Errorf("%w: %v is moving already", errNotHolder, flow)
		}
		// An earlier connection's row, or a move that never settled.
		f.table.DropIf(flow, c.State, c.Since)
	}
	now := time.Now()
	f.table.Adopt(flow, from, conntab.Handoffed, now, time.Time{})
	return now, nil
}

// errNotHolder: a BE asked to move a connection the FE forwards to
// another BE.
var errNotHolder = fmt.Errorf("the flow is another BE's")

// dropMoved forgets flow's row once its move from from ended without
// moving it: with accept = be the kernel owns every pin, timeouts and
// TIME_WAIT included. A flow that moved keeps its row while its pin lasts
// (keepPins): its pin, unlike a placed flow's, is not what the hash says,
// so a reinstall of the table (after `nft flush ruleset`) must put it back.
func (f *FE) dropMoved(flow netip.AddrPort, from netip.Addr) {
	if c, ok := f.table.Get(flow); ok && c.State == conntab.Handoffed && c.BE == from {
		f.table.DropIf(flow, c.State, c.Since)
	}
}

// keepPins drops, every period, the rows of moved flows whose pins the
// kernel no longer holds (their connections ended, TIME_WAIT and all): one
// look-up per row older than period.
func (f *FE) keepPins(ctx context.Context, period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		for _, c := range f.table.Snapshot() {
			if c.State != conntab.Handoffed || now.Sub(c.Since) < period {
				continue
			}
			if _, ok, err := f.place.holder(c.Client); err == nil && !ok {
				f.table.DropIf(c.Client, c.State, c.Since)
			}
		}
	}
}

// acceptBE tells whether the FE runs with accept = be.
func (f *FE) acceptBE() bool { return f.cfg.Accept == config.AcceptBE }
