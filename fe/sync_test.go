package fe

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"tcpha/backends"
	"tcpha/handoff/conntab"
	"tcpha/handoff/wire"
)

var peerFE = netip.MustParseAddr("10.0.0.3")

// syncFE is testFE with [fe] syncpeer: standby under keepalived (holds
// says whether the VIP is on its interface), or always active (holds nil).
func syncFE(t *testing.T, holds func() (bool, error)) (*FE, *fakeFlows) {
	t.Helper()
	f, flows, _ := testFE(t, 0)
	f.cfg.RAddr, f.cfg.SyncPeer, f.cfg.FEPort = netip.MustParseAddr("10.0.0.2"), peerFE, 80
	f.startSync([]byte("test-secret-16byte"), holds)
	t.Cleanup(f.sync.pool.Close)
	return f, flows
}

func batch(t *testing.T, flags uint8, events ...wire.SyncEvent) []byte {
	t.Helper()
	p, err := wire.SyncBatch{Flags: flags, Events: events}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func row(f *FE, flow netip.AddrPort) string {
	c, ok := f.table.Get(flow)
	if !ok {
		return "none"
	}
	return c.State.String() + " " + c.BE.String()
}

// The standby applies the active FE's batches to its kernel and table: new
// flows forwarded, moves replaced, TIME_WAIT kept, removals removed, and
// at the end of a resync the flows the peer no longer has dropped. It
// mirrors them in its own outbox, for the day it takes over.
func TestSyncApply(t *testing.T) {
	f, flows := syncFE(t, func() (bool, error) { return false, nil })
	if f.active() {
		t.Fatal("a syncing FE under keepalived starts active")
	}
	c1, c2, c3 := netip.MustParseAddrPort("10.0.0.10:1001"), netip.MustParseAddrPort("10.0.0.10:1002"), netip.MustParseAddrPort("10.0.0.10:1003")
	// A flow adopted from the kernel at start, ended on the peer since.
	f.table.Adopt(c3, be1, conntab.Handoffed, time.Now(), time.Time{})
	if res, why := f.applySync(batch(t, wire.SyncBegin,
		wire.SyncEvent{Kind: wire.SyncForward, Flow: c1, BE: be1},
		wire.SyncEvent{Kind: wire.SyncTimeWait, Flow: c2, BE: be2, Left: 5 * time.Second})); res != wire.ResultOK {
		t.Fatalf("resync page: %v %s", res, why)
	}
	if row(f, c1) != "HANDOFFED 10.0.0.11" || row(f, c2) != "TIME_WAIT 10.0.0.12" {
		t.Fatalf("rows %q %q", row(f, c1), row(f, c2))
	}
	if c, _ := f.table.Get(c2); time.Until(c.Until) < 4*time.Second {
		t.Errorf("TIME_WAIT until %v, want about 5 s from now", c.Until)
	}
	if res, _ := f.applySync(batch(t, wire.SyncEnd)); res != wire.ResultOK {
		t.Fatalf("resync end: %v", res)
	}
	if row(f, c3) != "none" {
		t.Errorf("the stale flow after the resync: %s, want none", row(f, c3))
	}
	// A move, a removal, and a forward already there (no kernel edit).
	f.applySync(batch(t, 0,
		wire.SyncEvent{Kind: wire.SyncForward, Flow: c1, BE: be2},
		wire.SyncEvent{Kind: wire.SyncRemove, Flow: c2}))
	f.applySync(batch(t, 0, wire.SyncEvent{Kind: wire.SyncForward, Flow: c1, BE: be2}))
	if row(f, c1) != "HANDOFFED 10.0.0.12" || row(f, c2) != "none" {
		t.Errorf("after a move and a removal: %q %q", row(f, c1), row(f, c2))
	}
	flows.mu.Lock()
	calls := slices.Clone(flows.calls)
	flows.mu.Unlock()
	slices.Sort(calls)
	want := []string{"forward 10.0.0.10:1001 10.0.0.11", "forward 10.0.0.10:1001 10.0.0.12", "forward 10.0.0.10:1002 10.0.0.12",
		"remove 10.0.0.10:1002", "remove 10.0.0.10:1003"}
	if !slices.Equal(calls, want) {
		t.Errorf("kernel edits %q\nwant %q", calls, want)
	}
	if n := f.sync.out.Len(); n != 1 {
		t.Errorf("the standby's outbox mirrors %d flows, want 1", n)
	}
	// Out of order, or to an FE that holds the VIP itself: refused,
	// nothing applied.
	if res, _ := f.applySync(batch(t, wire.SyncEnd)); res != wire.ResultInvalid {
		t.Errorf("a resync end without its begin: %v", res)
	}
	if res, _ := f.applySync([]byte{9}); res != wire.ResultBadFrame {
		t.Errorf("garbage: %v", res)
	}
	f.act.set(true)
	if res, _ := f.applySync(batch(t, 0, wire.SyncEvent{Kind: wire.SyncRemove, Flow: c1})); res != wire.ResultBusy || row(f, c1) == "none" {
		t.Errorf("a batch to an active FE: %v, row %s", res, row(f, c1))
	}
}

// The active FE's own changes go to its outbox: a forward, a closing seen
// by the queue, an expiry.
func TestSyncRecords(t *testing.T) {
	f, _ := syncFE(t, nil)
	if !f.active() {
		t.Fatal("a syncing FE with vip = agent is not active")
	}
	c1 := netip.MustParseAddrPort("10.0.0.10:1001")
	ctx := context.Background()
	f.flows.Forward(ctx, c1, be1, false)
	b, ok := f.sync.out.Next()
	if !ok || b.Flags != wire.SyncBegin|wire.SyncEnd || len(b.Events) != 1 || b.Events[0] != (wire.SyncEvent{Kind: wire.SyncForward, Flow: c1, BE: be1}) {
		t.Fatalf("first batch %+v %v, want a resync with the forward", b, ok)
	}
	f.flows.UnforwardIf(ctx, c1, func() bool { return true })
	if b, _ := f.sync.out.Next(); len(b.Events) != 1 || b.Events[0].Kind != wire.SyncRemove {
		t.Fatalf("after the unforward: %+v", b)
	}
	f.flows.UnforwardIf(ctx, c1, func() bool { return false }) // skipped: nothing to say
	if b, ok := f.sync.out.Next(); ok {
		t.Fatalf("a skipped edit was sent: %+v", b)
	}
}

// A standby leaves the peer's flows alone: no reaping, no held questions
// (whileActive runs them only while active), no migrations, no resets at
// a drain.
func TestStandbyLeavesFlows(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var holds atomic.Bool
		f, _ := syncFE(t, func() (bool, error) { return holds.Load(), nil })
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var runs, running atomic.Int64
		go f.whileActive(ctx, func(ctx context.Context) {
			runs.Add(1)
			running.Add(1)
			<-ctx.Done()
			running.Add(-1)
		})
		go f.watchVIP(ctx)
		time.Sleep(time.Second)
		synctest.Wait()
		if runs.Load() != 0 {
			t.Fatal("the reaper ran on a standby")
		}
		var res wire.Result
		f.admitMove(be1, wire.Frame{Type: wire.TypeMigrate}, f.migrate, func(r wire.Result, _ string) { res = r })
		if res != wire.ResultUnknown {
			t.Errorf("a standby's answer to a migration: %v, want unknown flow (the BE asks the other FE)", res)
		}
		client := netip.MustParseAddrPort("10.0.0.10:1001")
		f.table.Adopt(client, be1, conntab.Handoffed, time.Now(), time.Time{})
		start := time.Now()
		f.Drain(time.Hour)
		if time.Since(start) > 0 {
			t.Errorf("a standby waited %v at its drain for the peer's connections", time.Since(start))
		}
		holds.Store(true) // keepalived moved the VIP here
		time.Sleep(150 * time.Millisecond)
		synctest.Wait()
		if runs.Load() != 1 || running.Load() != 1 || !f.sync.out.Active() {
			t.Fatalf("after the takeover: runs %d running %d outbox active %v", runs.Load(), running.Load(), f.sync.out.Active())
		}
		holds.Store(false)
		time.Sleep(150 * time.Millisecond)
		synctest.Wait()
		if running.Load() != 0 || f.sync.out.Active() {
			t.Errorf("after the VIP left: running %d, outbox active %v", running.Load(), f.sync.out.Active())
		}
	})
}

// The sync port admits only the peer FE of this VIP, from its own address;
// an FE without syncpeer admits no FE at all.
func TestAdmitPeer(t *testing.T) {
	f, _ := syncFE(t, nil)
	from := func(a string) net.Addr { return net.TCPAddrFromAddrPort(netip.MustParseAddrPort(a)) }
	hello := func(role wire.Role, addr string, v netip.AddrPort) wire.Hello {
		return wire.Hello{Role: role, Addr: netip.AddrPortFrom(netip.MustParseAddr(addr), 80), VIP: v}
	}
	for _, c := range []struct {
		name   string
		remote string
		h      wire.Hello
		ok     bool
	}{
		{"the peer", "10.0.0.3:40000", hello(wire.RoleFE, "10.0.0.3", vip), true},
		{"a BE", "10.0.0.3:40000", hello(wire.RoleBE, "10.0.0.3", vip), false},
		{"another FE", "10.0.0.4:40000", hello(wire.RoleFE, "10.0.0.4", vip), false},
		{"the peer's name from elsewhere", "10.0.0.4:40000", hello(wire.RoleFE, "10.0.0.3", vip), false},
		{"another VIP", "10.0.0.3:40000", hello(wire.RoleFE, "10.0.0.3", netip.MustParseAddrPort("10.0.0.101:80")), false},
	} {
		if err := f.admitPeer(from(c.remote), c.h); (err == nil) != c.ok {
			t.Errorf("%s: %v, want admitted %v", c.name, err, c.ok)
		}
	}
	plain, _, _ := testFE(t, 0)
	if err := plain.admitPeer(from("10.0.0.3:40000"), hello(wire.RoleFE, "10.0.0.3", vip)); err == nil {
		t.Error("an FE without syncpeer admitted a sync session")
	}
}

// The sync's metrics and status line: the events and batches applied from
// the peer, the resync received, the session and the standby's role.
func TestSyncMetrics(t *testing.T) {
	f, _ := syncFE(t, func() (bool, error) { return false, nil })
	c1, c2 := netip.MustParseAddrPort("10.0.0.10:1001"), netip.MustParseAddrPort("10.0.0.10:1002")
	f.applySync(batch(t, wire.SyncBegin|wire.SyncEnd,
		wire.SyncEvent{Kind: wire.SyncForward, Flow: c1, BE: be1},
		wire.SyncEvent{Kind: wire.SyncForward, Flow: c2, BE: be2}))
	f.applySync([]byte("garbage"))
	mfs, err := f.m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			name := mf.GetName()
			for _, l := range m.GetLabel() {
				name += "{" + l.GetName() + "=" + l.GetValue() + "}"
			}
			switch {
			case m.Counter != nil:
				got[name] = m.GetCounter().GetValue()
			case m.Gauge != nil:
				got[name] = m.GetGauge().GetValue()
			}
		}
	}
	for name, want := range map[string]float64{
		"tcpha_sync_events_total{direction=received}": 2,
		"tcpha_sync_events_total{direction=sent}":     0,
		"tcpha_sync_batches_total{result=applied}":    1,
		"tcpha_sync_batches_total{result=refused}":    1,
		"tcpha_sync_session_up":                       0,
		"tcpha_sync_active":                           0,
		"tcpha_sync_lag_seconds":                      0,
	} {
		if v, ok := got[name]; !ok || v != want {
			t.Errorf("%s = %v (present %v), want %v", name, v, ok, want)
		}
	}
	if at := got["tcpha_sync_last_resync_timestamp_seconds{direction=received}"]; time.Since(time.Unix(int64(at), 0)) > time.Minute {
		t.Errorf("last resync received at %v, want now", at)
	}
	if _, ok := got["tcpha_sync_last_resync_timestamp_seconds{direction=sent}"]; ok {
		t.Error("a standby that never sent a resync exports its time")
	}
	// promtool check metrics's rules (promlint).
	problems, err := testutil.CollectAndLint(syncCollector{f.sync})
	if err != nil || len(problems) > 0 {
		t.Errorf("the sync's metrics do not lint: %v %+v", err, problems)
	}
	st := f.syncStatus()
	if st.Received != 2 || st.LastResyncIn == "" || st.LastResync != "" {
		t.Errorf("status %+v, want 2 events received, a resync received and none sent", st)
	}
}

// A move the dead FE carried out and synced here is answered OK when its
// BE asks this FE again after the takeover (it never got the dead FE's
// answer): the flow is already where the BE asks, and nothing is edited.
// A later switch of the flow is carried out as any other.
func TestSyncedSwitchAskedAgain(t *testing.T) {
	f, flows := syncFE(t, func() (bool, error) { return false, nil })
	var mover Mover = &fakeMover{}
	f.mover.Store(&mover)
	c1 := netip.MustParseAddrPort("10.0.0.10:1001")
	f.applySync(batch(t, wire.SyncBegin|wire.SyncEnd, wire.SyncEvent{Kind: wire.SyncForward, Flow: c1, BE: be1}))
	f.applySync(batch(t, 0, wire.SyncEvent{Kind: wire.SyncForward, Flow: c1, BE: be2})) // the peer's move
	flows.mu.Lock()
	edits := len(flows.calls)
	flows.mu.Unlock()
	sw := func(to netip.Addr) wire.Frame {
		p, err := wire.Switch{Client: c1, To: to}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return wire.Frame{Type: wire.TypeSwitch, Payload: p}
	}
	if res, why := f.switchFlow(be1, sw(be2)); res != wire.ResultOK {
		t.Errorf("be1's switch to be2, synced, asked again: %v %s", res, why)
	}
	flows.mu.Lock()
	if n := len(flows.calls) - edits; n != 0 {
		t.Errorf("answering it edited the kernel %d times", n)
	}
	flows.mu.Unlock()
	// be2, which holds the flow now, moving it back is a switch of its own.
	if res, why := f.switchFlow(be2, sw(be1)); res != wire.ResultOK {
		t.Errorf("be2 moving the flow back to be1: %v %s", res, why)
	}
	flows.mu.Lock()
	if n := len(flows.calls) - edits; n != 1 {
		t.Errorf("be2's own switch made %d kernel edits, want 1", n)
	}
	flows.mu.Unlock()
}

// With accept = be the active FE sends its peer only the pins whose BE is
// not their slot's (flows placed before a slot change): the peer's hash
// places the others alike. A sent pin the kernel no longer holds is
// removed at the next read; one whose slot came back to its BE is
// forgotten.
func TestSendPins(t *testing.T) {
	f, _ := syncFE(t, nil) // always active
	f.place = newPlacer()
	slots := make(backends.SlotTable, backends.SlotCount)
	for i := range slots {
		slots[i] = be1
	}
	// Every slot is be1's: a pin to be2 is off its slot.
	onSlot, offSlot := netip.MustParseAddrPort("10.0.0.10:2001"), netip.MustParseAddrPort("10.0.0.10:2002")
	pins := kernelHolders{onSlot: be1, offSlot: be2}
	f.place.look = pins
	sent := map[netip.AddrPort]netip.Addr{}
	b := func() []wire.SyncEvent {
		t.Helper()
		var all []wire.SyncEvent
		for {
			b, ok := f.sync.out.Next()
			if !ok {
				return all
			}
			all = append(all, b.Events...)
		}
	}
	b() // the resync of becoming active: nothing yet
	if err := f.sendPins(slots, sent, false); err != nil {
		t.Fatal(err)
	}
	want := []wire.SyncEvent{{Kind: wire.SyncForward, Flow: offSlot, BE: be2}}
	if got := b(); !slices.Equal(got, want) {
		t.Errorf("after a read: %+v, want only the off-slot pin %+v", got, want)
	}
	// Read again, nothing changed: nothing new to send.
	if err := f.sendPins(slots, sent, false); err != nil {
		t.Fatal(err)
	}
	if got := b(); len(got) != 0 {
		t.Errorf("a second read sent %+v", got)
	}
	// A refresh sends it again, unchanged: the peer's copy times out.
	if err := f.sendPins(slots, sent, true); err != nil {
		t.Fatal(err)
	}
	if got := b(); !slices.Equal(got, want) {
		t.Errorf("after a refresh: %+v, want %+v", got, want)
	}
	delete(pins, offSlot) // its connection ended, its pin timed out
	if err := f.sendPins(slots, sent, false); err != nil {
		t.Fatal(err)
	}
	if got, want := b(), []wire.SyncEvent{{Kind: wire.SyncRemove, Flow: offSlot}}; !slices.Equal(got, want) {
		t.Errorf("after the pin went: %+v, want %+v", got, want)
	}
	if len(sent) != 0 {
		t.Errorf("still tracked: %v", sent)
	}
}

// With accept = be a standby adds a pin sent again unchanged to its kernel
// again (which starts the element's timeout anew: it sees none of the
// flow's packets); with accept = fe the forward map has no timeout, and an
// unchanged flow costs no edit.
func TestSyncRefreshesPins(t *testing.T) {
	for _, acceptBE := range []bool{false, true} {
		f, flows := syncFE(t, func() (bool, error) { return false, nil })
		if acceptBE {
			f.place = newPlacer()
			f.place.look = kernelHolders{}
		}
		c1 := netip.MustParseAddrPort("10.0.0.10:1001")
		f.applySync(batch(t, wire.SyncBegin|wire.SyncEnd, wire.SyncEvent{Kind: wire.SyncForward, Flow: c1, BE: be1}))
		f.applySync(batch(t, 0, wire.SyncEvent{Kind: wire.SyncForward, Flow: c1, BE: be1}))
		flows.mu.Lock()
		n := 0
		for _, c := range flows.calls {
			if c == "forward "+c1.String()+" "+be1.String() {
				n++
			}
		}
		flows.mu.Unlock()
		if want := map[bool]int{false: 1, true: 2}[acceptBE]; n != want {
			t.Errorf("accept = be %v: %d kernel forwards for a flow sent twice unchanged, want %d", acceptBE, n, want)
		}
	}
}
