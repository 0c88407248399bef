package fe

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"tcpha/backends"
	"tcpha/handoff/conntab"
	"tcpha/handoff/ctl"
	"tcpha/handoff/flowsync"
	"tcpha/handoff/wire"
	"tcpha/nft"
)

// Flow-state sync between two FEs (issue 17, `[fe] syncpeer`). Each FE
// mirrors its forwarded flows in a flowsync.Outbox and, while it holds the
// VIP (active), streams their changes to the other FE's raddr:feport; the
// standby applies them to its own forward map and connection table, so its
// kernel already forwards every handed-off flow when VRRP moves the VIP.
// Only the active FE reaps, asks BEs what they hold, answers migrations
// and resets at a drain: the standby's rows are the peer's, and it must
// not end or move them. With vip = agent, or without syncpeer, the FE is
// always active (today's behaviour).

// syncWorkers bounds the events of one batch applied at once: their nft
// edits then share transactions (the flow owner's group commit) instead of
// costing one each.
const syncWorkers = 64

// vipPoll is how often a standby under keepalived looks for the VIP on its
// interface: a takeover starts the reaper and migrations within it. The
// forwarding does not wait for it: it is in the kernel already.
const vipPoll = 100 * time.Millisecond

// syncer is an FE's side of the sync: its outbox and session to the peer,
// and the inbox the peer's batches go through.
type syncer struct {
	peer netip.AddrPort
	out  *flowsync.Outbox
	pool *ctl.Pool
	// holdsVIP tells whether the VIP is on this FE's interface (nil: the
	// FE is always active).
	holdsVIP func() (bool, error)
	// mu makes the peer's batches apply one at a time, in order.
	mu      sync.Mutex
	in      flowsync.Inbox
	applied atomic.Int64 // batches applied
	refused atomic.Int64 // batches refused (this FE active, a bad resync)
	// eventsIn counts the events of the batches applied; resyncedIn is
	// when the peer's last full resync ended here (Unix ns, 0 never).
	eventsIn   atomic.Int64
	resyncedIn atomic.Int64
	failing    atomic.Bool // the last send failed: log the next failure quietly
}

// activity is whether the FE is active, and a channel closed at each
// change.
type activity struct {
	mu      sync.Mutex
	standby bool // the zero value is active
	ch      chan struct{}
}

func (a *activity) get() (active bool, changed <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ch == nil {
		a.ch = make(chan struct{})
	}
	return !a.standby, a.ch
}

// set records active and reports whether it changed.
func (a *activity) set(active bool) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.standby == !active {
		return false
	}
	a.standby = !active
	if a.ch != nil {
		close(a.ch)
	}
	a.ch = make(chan struct{})
	return true
}

// active tells whether this FE holds the VIP: it reaps, moves and resets.
func (f *FE) active() bool {
	on, _ := f.act.get()
	return on
}

// whileActive runs fn while the FE is active, with a context that ends
// when it turns standby, and again at each takeover, until ctx ends.
func (f *FE) whileActive(ctx context.Context, fn func(context.Context)) {
	for {
		on, changed := f.act.get()
		if !on {
			select {
			case <-ctx.Done():
				return
			case <-changed:
				continue
			}
		}
		run, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { defer close(done); fn(run) }()
		select {
		case <-ctx.Done():
		case <-changed:
		}
		stop()
		<-done
		if ctx.Err() != nil {
			return
		}
	}
}

// syncedFlows is the FE's forwarding with every change of a flow's element
// recorded in the outbox.
type syncedFlows struct {
	Forwarding
	out *flowsync.Outbox
}

func (s syncedFlows) Forward(ctx context.Context, flow netip.AddrPort, be netip.Addr, replace bool) error {
	err := s.Forwarding.Forward(ctx, flow, be, replace)
	if err == nil {
		s.out.Forward(flow, be)
	}
	return err
}

func (s syncedFlows) Unforward(ctx context.Context, flow netip.AddrPort) error {
	err := s.Forwarding.Unforward(ctx, flow)
	if err == nil {
		s.out.Remove(flow)
	}
	return err
}

func (s syncedFlows) UnforwardIf(ctx context.Context, flow netip.AddrPort, still func() bool) error {
	err := s.Forwarding.UnforwardIf(ctx, flow, still)
	if err == nil {
		s.out.Remove(flow)
	}
	return err
}

func (s syncedFlows) Remove(ctx context.Context, flow netip.AddrPort, still func() bool) error {
	err := s.Forwarding.Remove(ctx, flow, still)
	if err == nil {
		s.out.Remove(flow)
	}
	return err
}

// startSync sets the sync up, if [fe] syncpeer asks for it: the outbox,
// seeded with the flows adopted from the kernel; the forwarding wrapped to
// feed it; the queue's TIME_WAITs too; the session to the peer. Under
// keepalived the FE starts standby until the VIP shows up on its interface.
func (f *FE) startSync(secret []byte, holdsVIP func() (bool, error)) {
	cfg := f.cfg
	if !cfg.SyncPeer.IsValid() || len(secret) == 0 {
		return
	}
	s := &syncer{peer: netip.AddrPortFrom(cfg.SyncPeer, cfg.FEPort), out: flowsync.NewOutbox(), holdsVIP: holdsVIP}
	for _, c := range f.table.Snapshot() {
		switch c.State {
		case conntab.Handoffed:
			s.out.Forward(c.Client, c.BE)
		case conntab.TimeWait:
			s.out.TimeWait(c.Client, c.BE, c.Until)
		}
	}
	f.flows = syncedFlows{Forwarding: f.flows, out: s.out}
	if f.obs != nil {
		f.obs.Closed = func(flow netip.AddrPort) {
			if c, ok := f.table.Get(flow); ok && c.State == conntab.TimeWait {
				s.out.TimeWait(flow, c.BE, c.Until)
			}
		}
	}
	s.pool = ctl.NewPool(&ctl.Config{
		Secret: secret, Log: f.log,
		Local: wire.Hello{Role: wire.RoleFE, Addr: netip.AddrPortFrom(cfg.RAddr, cfg.FEPort), VIP: netip.AddrPortFrom(cfg.VAddr, cfg.Port)},
	}, ctl.Dialer(cfg.RAddr), 1)
	// A session that (re)connects gets a full resync: the peer may have
	// restarted, or missed batches while the session was down.
	s.pool.OnSession = func(netip.AddrPort, *ctl.Session) { s.out.Resync() }
	s.pool.OnChange = func(peer netip.AddrPort, up bool, err error) {
		if up {
			f.log.Info("sync session to the peer FE up", "op", "sync", "peer", peer.String())
		} else {
			f.log.Warn("sync session to the peer FE down", "op", "sync", "peer", peer.String(), "err", err)
		}
	}
	s.out.Ready = func() bool { return len(s.pool.Sessions(s.peer)) > 0 }
	f.sync = s
	f.m.Registry.MustRegister(syncCollector{s})
	if holdsVIP != nil {
		f.act.set(false) // standby until the VIP shows up
	} else {
		s.out.SetActive(true)
	}
	f.log.Info("flow sync on", "op", "sync", "peer", s.peer.String(), "flows", s.out.Len(), "vip_owner", string(cfg.VIP))
}

// syncLoops runs the sync's loops until ctx ends: the outbox's sends, and
// under keepalived the watch for the VIP.
func (f *FE) syncLoops(ctx context.Context) {
	s := f.sync
	if s == nil {
		return
	}
	s.pool.Add(s.peer)
	var wg sync.WaitGroup
	wg.Go(func() {
		s.out.Run(ctx, func(ctx context.Context, b wire.SyncBatch) error { return f.sendSync(ctx, b) })
	})
	if s.holdsVIP != nil {
		wg.Go(func() { f.watchVIP(ctx) })
	}
	if f.place != nil {
		wg.Go(func() { f.whileActive(ctx, f.syncPins) })
	}
	wg.Wait()
}

// pinScanEvery is how often the active FE with accept = be compares its
// slot map with the one of its last read of the pins.
const pinScanEvery = time.Second

// syncPins, with accept = be, sends the peer the flows the kernel pinned
// to a BE other than their slot's now: flows placed before a slot change
// (a BE drained, reweighted, gone or back). The peer's hash places every
// other pinned flow where this FE's did, since both FEs compute the same
// slot map from the same BEs (backends.Slots), so those are never sent.
// It reads the pins (one dump of @forward: ~37 ms for 10,000 here) at each
// change of the slot map, at each takeover, and every third of idletimeout,
// to send them again (the peer's copies time out) and to remove the ended
// ones; its cost follows slot changes, not connections. It runs while the
// FE is active.
func (f *FE) syncPins(ctx context.Context) {
	t := time.NewTicker(pinScanEvery)
	defer t.Stop()
	var last backends.SlotTable
	refreshed := time.Now()
	sent := map[netip.AddrPort]netip.Addr{}
	for {
		slots := f.place.slotMap()
		// The peer's copies time out after idletimeout without a packet:
		// every third of it the pins are read and the off-slot ones go
		// again, unchanged.
		refresh := time.Since(refreshed) >= f.cfg.IdleTimeout/3
		if last == nil || refresh || !slices.Equal(slots, last) {
			if err := f.sendPins(slots, sent, refresh); err != nil {
				f.log.Warn("pinned flows not read for the sync", "op", "sync", "err", err)
			} else {
				last = slots
				if refresh {
					refreshed = time.Now()
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sendPins puts in the outbox every pin whose BE is not its slot's in
// slots, and removes those of sent the kernel no longer holds; sent is
// updated to the pins sent. With refresh, the pins sent before go again,
// unchanged.
func (f *FE) sendPins(slots backends.SlotTable, sent map[netip.AddrPort]netip.Addr, refresh bool) error {
	pins, err := f.place.pins()
	if err != nil {
		return err
	}
	n := 0
	for flow, be := range pins {
		if slot := slots[nft.SlotOf(flow, backends.SlotCount, placeSeed)]; slot == be {
			continue
		}
		f.sync.out.Forward(flow, be)
		if refresh {
			f.sync.out.Touch(flow) // sent before, or since by a move
		}
		sent[flow] = be
		n++
	}
	gone := 0
	for flow := range sent {
		now, ok := pins[flow]
		switch {
		case !ok:
			// Ended (its pin timed out): the peer drops it too.
			f.sync.out.Remove(flow)
			delete(sent, flow)
			gone++
		case slots[nft.SlotOf(flow, backends.SlotCount, placeSeed)] == now:
			// Its slot came back to its BE: the peer's hash agrees, and
			// its element there times out on its own.
			delete(sent, flow)
		}
	}
	if n > 0 || gone > 0 {
		f.log.Debug("pinned flows off their slot's BE synced", "op", "sync", "pins", len(pins), "off_slot", n, "gone", gone)
	}
	return nil
}

// slotMap is a copy of the slot map as installed.
func (p *placer) slotMap() backends.SlotTable {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.slots)
}

// pins reads every flow the kernel forwards (nft.Reader.Members).
func (p *placer) pins() (map[netip.AddrPort]netip.Addr, error) {
	m, err := p.members(nft.MapForward)
	if err != nil {
		return nil, err
	}
	return m[0], nil
}

// watchVIP makes the FE active when the VIP appears on its interface
// (keepalived made it the master), standby when it goes.
func (f *FE) watchVIP(ctx context.Context) {
	t := time.NewTicker(vipPoll)
	defer t.Stop()
	for {
		has, err := f.sync.holdsVIP()
		if err != nil {
			f.log.Debug("look for the VIP", "op", "sync", "err", err)
		} else if f.act.set(has) {
			f.sync.out.SetActive(has)
			if has {
				f.log.Warn("takeover: this FE holds the VIP; it reaps, moves and answers for the synced flows", "op", "sync",
					"flows", f.sync.out.Len())
			} else {
				f.log.Warn("standby: the VIP left this FE; the peer's flows are its to end", "op", "sync")
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sendSync sends one batch to the peer and waits for it to be applied.
func (f *FE) sendSync(ctx context.Context, b wire.SyncBatch) (err error) {
	s := f.sync
	defer func() {
		switch {
		case err == nil:
			if s.failing.Swap(false) {
				f.log.Info("sync to the peer FE resumed", "op", "sync", "peer", s.peer.String())
			}
		case !s.failing.Swap(true):
			f.log.Warn("sync to the peer FE failed; a full resync follows", "op", "sync", "peer", s.peer.String(), "err", err)
		default:
			f.log.Debug("sync to the peer FE failed", "op", "sync", "peer", s.peer.String(), "err", err)
		}
	}()
	sess, err := s.pool.Get(s.peer, nil)
	if err != nil {
		return fmt.Errorf("sync %d flows to %v: %w", len(b.Events), s.peer, err)
	}
	p, err := b.MarshalBinary()
	if err != nil {
		return fmt.Errorf("encode a sync batch: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	r, err := sess.Call(cctx, wire.Frame{Type: wire.TypeSync, Payload: p})
	if err != nil {
		return fmt.Errorf("sync %d flows to %v: %w", len(b.Events), s.peer, err)
	}
	var ack wire.Ack
	if err := ack.UnmarshalBinary(r.Payload); err != nil || r.Type != wire.TypeAck {
		return fmt.Errorf("sync to %v: bad answer %v: %w", s.peer, r.Type, errors.Join(err, wire.ErrFormat))
	}
	if ack.Result != wire.ResultOK {
		return fmt.Errorf("sync to %v refused: %v: %s", s.peer, ack.Result, ack.Reason)
	}
	return nil
}

// admitPeer takes a sync session only from the peer FE of this VIP, saying
// so from its own address (the handshake then proves the secret).
func (f *FE) admitPeer(remote net.Addr, h wire.Hello) error {
	src, _ := netip.ParseAddrPort(remote.String())
	switch {
	case f.sync == nil:
		return errors.New("an FE without syncpeer takes no sync session")
	case h.Role != wire.RoleFE:
		return fmt.Errorf("a %v cannot sync", h.Role)
	case src.Addr().Unmap() != f.sync.peer.Addr() || h.Addr.Addr() != f.sync.peer.Addr():
		return fmt.Errorf("sync from %v (hello says %v), syncpeer is %v", src.Addr(), h.Addr.Addr(), f.sync.peer.Addr())
	case h.VIP.Addr() != f.cfg.VAddr:
		return fmt.Errorf("the peer FE serves VIP %v, this FE %v", h.VIP.Addr(), f.cfg.VAddr)
	}
	return nil
}

// serveSync serves the peer's frames: sync batches, applied in their own
// goroutine (a handler must not block the session's reader), one at a
// time and in order (the peer waits for each ack before the next).
func (f *FE) serveSync(s *ctl.Session, fr wire.Frame) {
	if fr.Type != wire.TypeSync || f.sync == nil {
		s.Reply(fr, ctl.AckFrame(wire.ResultInvalid, "unexpected "+fr.Type.String()))
		return
	}
	go func() {
		res, why := f.applySync(fr.Payload)
		s.Reply(fr, ctl.AckFrame(res, why))
	}()
}

// applySync applies one batch from the peer.
func (f *FE) applySync(payload []byte) (wire.Result, string) {
	s := f.sync
	var b wire.SyncBatch
	if err := b.UnmarshalBinary(payload); err != nil {
		s.refused.Add(1)
		return wire.ResultBadFrame, err.Error()
	}
	if f.active() {
		// Both FEs hold the VIP (a split brain, or a standby that has not
		// yet seen the VIP go): this FE's own flows are the truth here.
		s.refused.Add(1)
		return wire.ResultBusy, "this FE holds the VIP"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	done, err := s.in.Take(b)
	if err != nil {
		s.refused.Add(1)
		return wire.ResultInvalid, err.Error()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	now := time.Now()
	failed := f.applyEvents(ctx, b.Events, now)
	if done {
		var have []netip.AddrPort
		for _, c := range f.table.Snapshot() {
			have = append(have, c.Client)
		}
		var gone []wire.SyncEvent
		for _, fl := range s.in.Stale(have) {
			gone = append(gone, wire.SyncEvent{Kind: wire.SyncRemove, Flow: fl})
		}
		failed += f.applyEvents(ctx, gone, now)
		f.log.Info("flows resynced from the peer FE", "op", "sync", "flows", f.table.Len(), "dropped", len(gone))
		s.resyncedIn.Store(now.UnixNano())
	}
	if failed > 0 {
		s.refused.Add(1)
		return wire.ResultRestore, fmt.Sprintf("%d of the batch's flows not applied", failed)
	}
	s.applied.Add(1)
	s.eventsIn.Add(int64(len(b.Events)))
	return wire.ResultOK, ""
}

// applyEvents applies events, syncWorkers at a time, and returns how many
// failed.
func (f *FE) applyEvents(ctx context.Context, events []wire.SyncEvent, now time.Time) int {
	var wg sync.WaitGroup
	var failed atomic.Int64
	sem := make(chan struct{}, syncWorkers)
	for _, e := range events {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := f.applyEvent(ctx, e, now); err != nil {
				failed.Add(1)
				f.log.Warn("sync event not applied", "op", "sync", "client", e.Flow.String(), "err", err)
			}
		})
	}
	wg.Wait()
	return int(failed.Load())
}

// applyEvent applies one event to the kernel, then the table (flowsync.Plan),
// and records the result in this FE's own outbox, for the day it takes over.
func (f *FE) applyEvent(ctx context.Context, e wire.SyncEvent, now time.Time) error {
	c, ok := f.table.Get(e.Flow)
	step := flowsync.Plan(flowsync.Have{Ok: ok, BE: c.BE, TimeWait: c.State == conntab.TimeWait}, e, now)
	if f.place != nil && e.Kind == wire.SyncForward && step.Kernel == flowsync.KernelNone {
		// With accept = be the forward map's elements time out after
		// idletimeout, and a standby's see none of the flow's packets:
		// the active FE sends its pins again (Outbox.Touch), and the
		// element is added again, which starts its timeout anew.
		step.Kernel, step.BE = flowsync.KernelForward, e.BE
	}
	switch step.Kernel {
	case flowsync.KernelForward:
		if err := f.flows.Forward(ctx, e.Flow, step.BE, true); err != nil {
			return err
		}
		if (ok && c.BE != step.BE) || f.place != nil {
			// A move (with accept = be, the only forwards synced): its
			// BE may ask this FE again once it takes over.
			f.switched.addPeer(e.Flow, step.BE, now)
		}
	case flowsync.KernelRemove:
		if err := f.flows.Remove(ctx, e.Flow, nil); err != nil {
			return err
		}
	}
	state := conntab.Handoffed
	switch step.Table {
	case flowsync.TableNone:
		return nil
	case flowsync.TableDrop:
		if ok {
			f.table.DropIf(e.Flow, c.State, c.Since)
		}
		f.sync.out.Remove(e.Flow)
		return nil
	case flowsync.TableTimeWait:
		state = conntab.TimeWait
	}
	if ok {
		f.table.DropIf(e.Flow, c.State, c.Since)
	}
	f.table.Adopt(e.Flow, step.BE, state, now, step.Until)
	if state == conntab.TimeWait {
		f.sync.out.TimeWait(e.Flow, step.BE, step.Until)
	} else {
		f.sync.out.Forward(e.Flow, step.BE)
	}
	return nil
}

// switchMemory is how long the FE remembers a switch it carried out, to
// answer the same request again: longer than a BE waits for the answer
// (be's moveAnswer, 6 s).
const switchMemory = 10 * time.Second

// switchRecord is a switch the FE carried out: flow from → to, at; or,
// with peer set, one the peer FE carried out (its sync says to where, not
// from where).
type switchRecord struct {
	from, to netip.Addr
	at       time.Time
	peer     bool
}

// switches are the switches carried out in the last switchMemory.
type switches struct {
	mu    sync.Mutex
	m     map[netip.AddrPort]switchRecord
	swept time.Time
}

// add records a switch; records older than switchMemory go, swept at
// most once a second, so that the map holds at most switchMemory's worth.
func (s *switches) add(flow netip.AddrPort, from, to netip.Addr, now time.Time) {
	s.put(flow, switchRecord{from: from, to: to, at: now})
}

// addPeer records a switch the peer FE carried out, by its sync.
func (s *switches) addPeer(flow netip.AddrPort, to netip.Addr, now time.Time) {
	s.put(flow, switchRecord{to: to, at: now, peer: true})
}

func (s *switches) put(flow netip.AddrPort, r switchRecord) {
	now := r.at
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[netip.AddrPort]switchRecord{}
	}
	if now.Sub(s.swept) > time.Second {
		s.swept = now
		for f, r := range s.m {
			if now.Sub(r.at) > switchMemory {
				delete(s.m, f)
			}
		}
	}
	s.m[flow] = r
}

// done tells whether the switch of flow from → to was carried out in the
// last switchMemory.
func (s *switches) done(flow netip.AddrPort, from, to netip.Addr, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.m[flow]
	return ok && (r.from == from || r.peer) && r.to == to && now.Sub(r.at) <= switchMemory
}

// switchedAlready tells whether the switch of flow from → to was carried
// out already and the flow is still forwarded to to, so that the request,
// asked again, is answered OK: a BE whose FE died before answering asks
// every FE again until one answers (handoff.AskFEsAgain), and an FE that
// carried out the first request but answered it late must not refuse the
// second, for the BE would then take the connection back while the kernel
// forwards it to the other BE. A switch the dead FE carried out and synced
// here counts, whoever asks: answering OK changes no forwarding. With
// accept = be, a flow the kernel has not pinned goes by hash.
func (f *FE) switchedAlready(flow netip.AddrPort, from, to netip.Addr) bool {
	if !f.switched.done(flow, from, to, time.Now()) {
		return false
	}
	if f.place == nil {
		c, ok := f.table.Get(flow)
		return ok && c.State == conntab.Handoffed && c.BE == to
	}
	be, ok, err := f.place.holder(flow)
	if err == nil && !ok {
		be, ok = f.place.slotBE(flow)
	}
	return err == nil && ok && be == to
}

// syncStatus is the sync's part of `tcphactl status`.
type syncStatus struct {
	Peer     string `json:"peer"`
	Active   bool   `json:"active"`
	Session  bool   `json:"session"`
	Flows    int    `json:"flows"`
	Pending  int    `json:"pending"`
	Batches  int64  `json:"sent_batches"`
	Events   int64  `json:"sent_events"`
	Resyncs  int64  `json:"resyncs"`
	Failures int64  `json:"failures"`
	Applied  int64  `json:"applied_batches"`
	Refused  int64  `json:"refused_batches"`
	LastErr  string `json:"last_error"`
	// Received counts the events applied from the peer; Lag is how long
	// the oldest change the peer has not acknowledged has waited, at
	// most; the last resyncs sent and received are RFC 3339 ("" never).
	Received     int64   `json:"received_events"`
	Lag          float64 `json:"lag_seconds"`
	LastResync   string  `json:"last_resync_sent"`
	LastResyncIn string  `json:"last_resync_received"`
}

func (f *FE) syncStatus() *syncStatus {
	s := f.sync
	if s == nil {
		return nil
	}
	st := s.out.Stats()
	return &syncStatus{
		Peer: s.peer.Addr().String(), Active: f.active(), Session: len(s.pool.Sessions(s.peer)) > 0,
		Flows: s.out.Len(), Pending: st.Pending, Batches: st.Batches, Events: st.Events, Resyncs: st.Resyncs,
		Failures: st.Failures, Applied: s.applied.Load(), Refused: s.refused.Load(), LastErr: st.LastErr,
		Received: s.eventsIn.Load(), Lag: st.Lag.Seconds(), LastResync: rfc3339(st.LastResync), LastResyncIn: rfc3339(unixNano(s.resyncedIn.Load())),
	}
}

// rfc3339 is t for `tcphactl status`: "" for never (zero).
func rfc3339(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.Format(time.RFC3339)
}

// unixNano is a time stored as Unix ns, 0 for never.
func unixNano(ns int64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// orNever is a status time, "never" for "".
func orNever(s string) string {
	if s == "" {
		return "never"
	}
	return s
}

// The sync's metrics, read when scraped.
var (
	descSyncEvents = prometheus.NewDesc("tcpha_sync_events_total",
		"FE, syncpeer: flow events sent to the peer FE (sent, acknowledged) and applied from it (received).", []string{"direction"}, nil)
	descSyncBatches = prometheus.NewDesc("tcpha_sync_batches_total",
		"FE, syncpeer: batches by result: sent (acknowledged), failed (not; a full resync follows), applied (from the peer), refused (from the peer).",
		[]string{"result"}, nil)
	descSyncResyncs = prometheus.NewDesc("tcpha_sync_resyncs_total",
		"FE, syncpeer: full resyncs started towards the peer FE.", nil, nil)
	descSyncUp = prometheus.NewDesc("tcpha_sync_session_up",
		"FE, syncpeer: 1 while the control session to the peer FE is up.", nil, nil)
	descSyncActive = prometheus.NewDesc("tcpha_sync_active",
		"FE, syncpeer: 1 while this FE holds the VIP and sends, 0 while it is the standby.", nil, nil)
	descSyncPending = prometheus.NewDesc("tcpha_sync_pending_flows",
		"FE, syncpeer: flows whose change waits to be sent.", nil, nil)
	descSyncLag = prometheus.NewDesc("tcpha_sync_lag_seconds",
		"FE, syncpeer: how long the oldest change the peer has not acknowledged has waited, at most (0: none).", nil, nil)
	descSyncLastResync = prometheus.NewDesc("tcpha_sync_last_resync_timestamp_seconds",
		"FE, syncpeer: Unix time of the last full resync started towards the peer (sent) or finished from it (received); absent before the first.",
		[]string{"direction"}, nil)
)

// syncCollector reads the sync's counters for a scrape.
type syncCollector struct{ s *syncer }

func (c syncCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSyncEvents, descSyncBatches, descSyncResyncs, descSyncUp, descSyncActive,
		descSyncPending, descSyncLag, descSyncLastResync} {
		ch <- d
	}
}

func (c syncCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	st := s.out.Stats()
	counter := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter(descSyncEvents, st.Events, "sent")
	counter(descSyncEvents, s.eventsIn.Load(), "received")
	counter(descSyncBatches, st.Batches, "sent")
	counter(descSyncBatches, st.Failures, "failed")
	counter(descSyncBatches, s.applied.Load(), "applied")
	counter(descSyncBatches, s.refused.Load(), "refused")
	counter(descSyncResyncs, st.Resyncs)
	gauge(descSyncUp, boolFloat(len(s.pool.Sessions(s.peer)) > 0))
	gauge(descSyncActive, boolFloat(s.out.Active()))
	gauge(descSyncPending, float64(st.Pending))
	gauge(descSyncLag, st.Lag.Seconds())
	if !st.LastResync.IsZero() {
		gauge(descSyncLastResync, float64(st.LastResync.UnixNano())/1e9, "sent")
	}
	if in := s.resyncedIn.Load(); in != 0 {
		gauge(descSyncLastResync, float64(in)/1e9, "received")
	}
}
