package flowsync

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"tcpha/handoff/wire"
)

var (
	be1 = netip.MustParseAddr("10.0.0.11")
	be2 = netip.MustParseAddr("10.0.0.12")
)

func flow(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("10.0.0.10"), port)
}

// A flow that changes between two batches goes out once, in its last
// state; an inactive outbox mirrors but sends nothing.
func TestOutboxCoalesces(t *testing.T) {
	now := time.Unix(1000, 0)
	o := NewOutbox()
	o.Now = func() time.Time { return now }
	o.Forward(flow(1), be1)
	o.Forward(flow(2), be1)
	if _, ok := o.Next(); ok {
		t.Fatal("an inactive outbox sent")
	}
	o.SetActive(true)
	b, ok := o.Next()
	if !ok || b.Flags != wire.SyncBegin|wire.SyncEnd || len(b.Events) != 2 {
		t.Fatalf("first batch after becoming active: %+v %v, want a whole resync of 2", b, ok)
	}
	o.Forward(flow(1), be2)                          // replaced (a move)
	o.TimeWait(flow(1), be2, now.Add(3*time.Second)) // then closed
	o.Forward(flow(3), be1)
	o.Remove(flow(3))       // came and went
	o.Forward(flow(2), be1) // no change
	b, ok = o.Next()
	want := []wire.SyncEvent{
		{Kind: wire.SyncTimeWait, Flow: flow(1), BE: be2, Left: 3 * time.Second},
		{Kind: wire.SyncRemove, Flow: flow(3)},
	}
	if !ok || b.Flags != 0 || !slices.Equal(b.Events, want) {
		t.Fatalf("batch %+v %v\nwant %+v", b, ok, want)
	}
	if _, ok := o.Next(); ok {
		t.Fatal("a batch with nothing changed")
	}
	if _, err := b.MarshalBinary(); err != nil {
		t.Fatalf("the batch does not encode: %v", err)
	}
	// A standby keeps no backlog, however long it applies its peer's
	// stream: its mirror is what becoming active resyncs.
	o.SetActive(false)
	for p := uint16(100); p < 1100; p++ {
		o.Forward(flow(p), be1)
		o.Remove(flow(p))
	}
	if st := o.Stats(); st.Pending != 0 || o.Len() != 2 {
		t.Errorf("an inactive outbox after 2000 changes: %d pending, %d flows; want 0 and 2", st.Pending, o.Len())
	}
	// Nor does an active one whose peer is away: past one batch more than
	// its flows, the backlog turns into a full resync.
	o.SetActive(true)
	o.Max = 10
	for p := uint16(100); p < 1100; p++ {
		o.Forward(flow(p), be1)
		o.Remove(flow(p))
	}
	if st := o.Stats(); st.Pending > o.Len()+10 {
		t.Errorf("an active outbox whose peer is away: %d pending for %d flows", st.Pending, o.Len())
	}
	if b, _ := o.Next(); b.Flags&wire.SyncBegin == 0 {
		t.Errorf("after the backlog: %+v, want a full resync", b)
	}
}

// A full resync pages every flow in order; changes made while it pages go
// out after its end, and a flow removed meanwhile is left out (the end
// drops it).
func TestOutboxResyncPages(t *testing.T) {
	o := NewOutbox()
	o.Max = 2
	for p := uint16(1); p <= 5; p++ {
		o.Forward(flow(p), be1)
	}
	o.SetActive(true)
	b, _ := o.Next()
	if b.Flags != wire.SyncBegin || len(b.Events) != 2 || b.Events[0].Flow != flow(1) {
		t.Fatalf("page 1: %+v", b)
	}
	o.Remove(flow(3))
	o.Forward(flow(6), be2)
	b, _ = o.Next()
	if b.Flags != wire.SyncEnd || len(b.Events) != 2 || b.Events[0].Flow != flow(4) || b.Events[1].Flow != flow(5) {
		t.Fatalf("page 2: %+v, want the end with flows 4 and 5 (3 is gone)", b)
	}
	b, _ = o.Next()
	if b.Flags != 0 || len(b.Events) != 2 || b.Events[0].Kind != wire.SyncRemove || b.Events[1].Flow != flow(6) {
		t.Fatalf("after the resync: %+v, want the changes made during it", b)
	}
	if s := o.Stats(); s.Resyncs != 1 || s.Pending != 0 {
		t.Errorf("stats %+v", s)
	}
}

// sink records what Run sends, and when.
type sink struct {
	mu      sync.Mutex
	batches []wire.SyncBatch
	at      []time.Time
	fail    int // sends to fail from now
}

func (s *sink) send(_ context.Context, b wire.SyncBatch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail > 0 {
		s.fail--
		return errors.New("session closed")
	}
	s.batches = append(s.batches, b)
	s.at = append(s.at, time.Now())
	return nil
}

func (s *sink) get() ([]wire.SyncBatch, []time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.batches), slices.Clone(s.at)
}

// The bound: a change reaches the peer within 100 ms, and changes
// close together share one batch.
func TestOutboxLag(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		o := NewOutbox()
		var s sink
		go o.Run(ctx, s.send)
		o.SetActive(true)
		synctest.Wait()
		time.Sleep(time.Second)
		synctest.Wait()
		if b, _ := s.get(); len(b) != 1 || b[0].Flags != wire.SyncBegin|wire.SyncEnd {
			t.Fatalf("on becoming active: %+v, want one empty resync", b)
		}
		start := time.Now()
		o.Forward(flow(1), be1)
		time.Sleep(10 * time.Millisecond)
		o.Forward(flow(2), be1)
		synctest.Wait()
		time.Sleep(200 * time.Millisecond)
		synctest.Wait()
		b, at := s.get()
		if len(b) != 2 || len(b[1].Events) != 2 {
			t.Fatalf("batches %+v, want the two changes in one", b)
		}
		if lag := at[1].Sub(start); lag > 100*time.Millisecond {
			t.Errorf("the first change went out after %v, want ≤ 100 ms", lag)
		}
	})
}

// A failed send is retried after Retry as a full resync, which carries
// every flow, those of the failed batch included; an inactive outbox and
// one whose session is down send nothing.
func TestOutboxRetryResync(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		o := NewOutbox()
		var up sync.Mutex
		ready := false
		o.Ready = func() bool { up.Lock(); defer up.Unlock(); return ready }
		s := sink{}
		go o.Run(ctx, s.send)
		o.Forward(flow(1), be1)
		time.Sleep(time.Second)
		synctest.Wait()
		if b, _ := s.get(); len(b) != 0 {
			t.Fatalf("an inactive outbox sent %+v", b)
		}
		o.SetActive(true)
		time.Sleep(time.Second)
		synctest.Wait()
		if b, _ := s.get(); len(b) != 0 {
			t.Fatalf("sent %+v without a session", b)
		}
		up.Lock()
		ready = true
		up.Unlock()
		s.mu.Lock()
		s.fail = 1
		s.mu.Unlock()
		o.Resync() // the session came up
		synctest.Wait()
		o.Forward(flow(2), be2)
		time.Sleep(500 * time.Millisecond)
		synctest.Wait()
		if b, _ := s.get(); len(b) != 0 {
			t.Fatalf("sent %+v before the retry", b)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		b, _ := s.get()
		if len(b) != 1 || b[0].Flags != wire.SyncBegin|wire.SyncEnd || len(b[0].Events) != 2 {
			t.Fatalf("after the retry: %+v, want one full resync of both flows", b)
		}
		if st := o.Stats(); st.Failures != 1 || st.LastErr != "" || st.Batches != 1 {
			t.Errorf("stats %+v", st)
		}
	})
}

func TestInbox(t *testing.T) {
	var in Inbox
	if _, err := in.Take(wire.SyncBatch{Flags: wire.SyncEnd}); !errors.Is(err, ErrNoBegin) {
		t.Fatalf("an end without a begin: %v", err)
	}
	if done, err := in.Take(wire.SyncBatch{Events: []wire.SyncEvent{{Kind: wire.SyncForward, Flow: flow(9), BE: be1}}}); done || err != nil {
		t.Fatalf("a plain batch: %v %v", done, err)
	}
	steps := []wire.SyncBatch{
		{Flags: wire.SyncBegin, Events: []wire.SyncEvent{{Kind: wire.SyncForward, Flow: flow(1), BE: be1}}},
		{Events: []wire.SyncEvent{{Kind: wire.SyncTimeWait, Flow: flow(2), BE: be1, Left: time.Second}, {Kind: wire.SyncRemove, Flow: flow(3)}}},
		{Flags: wire.SyncEnd},
	}
	for i, b := range steps {
		done, err := in.Take(b)
		if err != nil || done != (i == 2) {
			t.Fatalf("page %d: done %v err %v", i, done, err)
		}
	}
	stale := in.Stale([]netip.AddrPort{flow(1), flow(2), flow(3), flow(4)})
	if !slices.Equal(stale, []netip.AddrPort{flow(3), flow(4)}) {
		t.Errorf("stale %v, want 3 (removed) and 4 (never named)", stale)
	}
	// A begin restarts a resync under way.
	in.Take(wire.SyncBatch{Flags: wire.SyncBegin, Events: []wire.SyncEvent{{Kind: wire.SyncForward, Flow: flow(1), BE: be1}}})
	in.Take(wire.SyncBatch{Flags: wire.SyncBegin | wire.SyncEnd, Events: []wire.SyncEvent{{Kind: wire.SyncForward, Flow: flow(2), BE: be1}}})
	if stale := in.Stale([]netip.AddrPort{flow(1), flow(2)}); !slices.Equal(stale, []netip.AddrPort{flow(1)}) {
		t.Errorf("after a restarted resync: stale %v, want 1", stale)
	}
}

func TestPlan(t *testing.T) {
	now := time.Unix(1000, 0)
	fwd := wire.SyncEvent{Kind: wire.SyncForward, Flow: flow(1), BE: be1}
	tw := wire.SyncEvent{Kind: wire.SyncTimeWait, Flow: flow(1), BE: be1, Left: 2 * time.Second}
	rm := wire.SyncEvent{Kind: wire.SyncRemove, Flow: flow(1)}
	for _, c := range []struct {
		name string
		have Have
		e    wire.SyncEvent
		want Step
	}{
		{"new flow", Have{}, fwd, Step{Kernel: KernelForward, Table: TableHandoffed, BE: be1}},
		{"already forwarded", Have{Ok: true, BE: be1}, fwd, Step{}},
		{"moved to another BE", Have{Ok: true, BE: be2}, fwd, Step{Kernel: KernelForward, Table: TableHandoffed, BE: be1}},
		{"new connection after TIME_WAIT", Have{Ok: true, BE: be1, TimeWait: true}, fwd, Step{Table: TableHandoffed, BE: be1}},
		{"closed", Have{Ok: true, BE: be1}, tw, Step{Table: TableTimeWait, BE: be1, Until: now.Add(2 * time.Second)}},
		{"closed, never seen", Have{}, tw, Step{Kernel: KernelForward, Table: TableTimeWait, BE: be1, Until: now.Add(2 * time.Second)}},
		{"closed on another BE", Have{Ok: true, BE: be2}, tw, Step{Kernel: KernelForward, Table: TableTimeWait, BE: be1, Until: now.Add(2 * time.Second)}},
		{"removed", Have{Ok: true, BE: be1, TimeWait: true}, rm, Step{Kernel: KernelRemove, Table: TableDrop}},
		{"removed, never seen", Have{}, rm, Step{}},
	} {
		if got := Plan(c.have, c.e, now); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}

// Stats.Lag is how long the oldest change the peer has not acknowledged
// has waited: it grows while a change waits, covers the batch in flight,
// and is 0 once the peer acknowledged everything. LastResync is when the
// last full resync started.
func TestOutboxStatsLag(t *testing.T) {
	now := time.Unix(1000, 0)
	o := NewOutbox()
	o.Now = func() time.Time { return now }
	if st := o.Stats(); st.Lag != 0 || !st.LastResync.IsZero() {
		t.Fatalf("a new outbox: %+v", st)
	}
	o.SetActive(true)
	now = now.Add(30 * time.Millisecond)
	b, _ := o.Next()
	if st := o.Stats(); st.Lag != 30*time.Millisecond || !st.LastResync.Equal(now) {
		t.Errorf("resync in flight: lag %v, last resync %v; want 30ms, %v", st.Lag, st.LastResync, now)
	}
	o.sent(b)
	if st := o.Stats(); st.Lag != 0 {
		t.Errorf("everything acknowledged: lag %v, want 0", st.Lag)
	}
	o.Forward(flow(1), be1)
	now = now.Add(20 * time.Millisecond)
	o.Forward(flow(2), be1)
	now = now.Add(20 * time.Millisecond)
	if st := o.Stats(); st.Lag != 40*time.Millisecond || st.Pending != 2 {
		t.Errorf("two changes waiting: lag %v pending %d, want 40ms 2", st.Lag, st.Pending)
	}
	o.Next()
	o.failed(errors.New("peer gone"))
	now = now.Add(time.Second)
	if st := o.Stats(); st.Lag != 1040*time.Millisecond {
		t.Errorf("after a failed send: lag %v, want 1.04s", st.Lag)
	}
	for {
		b, ok := o.Next()
		if !ok {
			break
		}
		o.sent(b)
	}
	if st := o.Stats(); st.Lag != 0 || st.Pending != 0 {
		t.Errorf("resynced: lag %v pending %d, want 0 0", st.Lag, st.Pending)
	}
	o.Forward(flow(3), be1)
	o.SetActive(false)
	if st := o.Stats(); st.Lag != 0 {
		t.Errorf("standby: lag %v, want 0 (a standby sends nothing)", st.Lag)
	}
}

// Touch sends a mirrored flow again, unchanged; a flow not mirrored, or an
// inactive outbox, sends nothing.
func TestOutboxTouch(t *testing.T) {
	o := NewOutbox()
	o.SetActive(true)
	o.Next() // the resync of becoming active
	o.Forward(flow(1), be1)
	o.Next()
	o.Touch(flow(1))
	o.Touch(flow(2))
	b, ok := o.Next()
	if want := []wire.SyncEvent{{Kind: wire.SyncForward, Flow: flow(1), BE: be1}}; !ok || !slices.Equal(b.Events, want) {
		t.Errorf("after Touch: %+v %v, want %+v", b, ok, want)
	}
	o.SetActive(false)
	o.Touch(flow(1))
	if _, ok := o.Next(); ok {
		t.Error("an inactive outbox sent a touched flow")
	}
}
