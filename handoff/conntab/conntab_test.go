package conntab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

var (
	flow = netip.MustParseAddrPort("10.0.0.10:40000")
	be1  = netip.MustParseAddr("10.0.0.11")
	t0   = time.Unix(1000, 0)
)

// spec is the state machine written out as the seed describes it (4.8.1
// for the FE, 4.8.2/4.8.3 for the BE), independently of fsm.go's table:
// "ROLE FROM EVENT -> TO ACTION". Every (role, state, event) not listed
// must be illegal.
var spec = `
FE CLOSED handoff-start -> HANDOFFING none
FE CLOSED syn -> CLOSED deliver
FE CLOSED fin -> CLOSED deliver
FE CLOSED rst -> CLOSED deliver
FE CLOSED ack -> CLOSED deliver
FE CLOSED payload -> CLOSED deliver
FE HANDOFFING handoff-acked -> HANDOFFED none
FE HANDOFFING handoff-failed -> CLOSED none
FE HANDOFFING syn -> HANDOFFING deliver
FE HANDOFFING fin -> HANDOFFING drop
FE HANDOFFING rst -> HANDOFFING drop
FE HANDOFFING ack -> HANDOFFING drop
FE HANDOFFING payload -> HANDOFFING drop
FE HANDOFFED handoff-start -> HANDOFFING none
FE HANDOFFED syn -> HANDOFFED deliver
FE HANDOFFED fin -> TIME_WAIT forward
FE HANDOFFED rst -> TIME_WAIT forward
FE HANDOFFED ack -> HANDOFFED forward
FE HANDOFFED payload -> HANDOFFED forward
FE HANDOFFED timer -> CLOSED none
FE TIME_WAIT handoff-start -> HANDOFFING none
FE TIME_WAIT syn -> TIME_WAIT deliver
FE TIME_WAIT fin -> TIME_WAIT forward
FE TIME_WAIT rst -> TIME_WAIT forward
FE TIME_WAIT ack -> TIME_WAIT forward
FE TIME_WAIT payload -> TIME_WAIT forward
FE TIME_WAIT timer -> CLOSED none
BE CLOSED restored -> ESTABLISHED none
BE CLOSED syn -> CLOSED deliver
BE CLOSED fin -> CLOSED deliver
BE CLOSED rst -> CLOSED deliver
BE CLOSED ack -> CLOSED deliver
BE CLOSED payload -> CLOSED deliver
BE ESTABLISHED syn -> ESTABLISHED deliver
BE ESTABLISHED fin -> TIME_WAIT deliver
BE ESTABLISHED rst -> TIME_WAIT deliver
BE ESTABLISHED ack -> ESTABLISHED deliver
BE ESTABLISHED payload -> ESTABLISHED deliver
BE ESTABLISHED reschedule -> WILLHANDOFF schedule
BE WILLHANDOFF handoff-start -> HANDOFFING none
BE WILLHANDOFF handoff-failed -> ESTABLISHED none
BE WILLHANDOFF syn -> WILLHANDOFF deliver
BE WILLHANDOFF fin -> TIME_WAIT deliver
BE WILLHANDOFF rst -> TIME_WAIT deliver
BE WILLHANDOFF ack -> WILLHANDOFF deliver
BE WILLHANDOFF payload -> WILLHANDOFF drop
BE WILLHANDOFF reschedule -> WILLHANDOFF drop
BE HANDOFFING handoff-acked -> HANDOFFED none
BE HANDOFFING handoff-failed -> ESTABLISHED none
BE HANDOFFING syn -> HANDOFFING drop
BE HANDOFFING fin -> HANDOFFING drop
BE HANDOFFING rst -> HANDOFFING drop
BE HANDOFFING ack -> HANDOFFING drop
BE HANDOFFING payload -> HANDOFFING drop
BE HANDOFFING reschedule -> HANDOFFING drop
BE HANDOFFED fe-acked -> CLOSED none
BE HANDOFFED timer -> CLOSED none
BE HANDOFFED syn -> HANDOFFED forward
BE HANDOFFED fin -> HANDOFFED forward
BE HANDOFFED rst -> HANDOFFED forward
BE HANDOFFED ack -> HANDOFFED forward
BE HANDOFFED payload -> HANDOFFED forward
BE HANDOFFED reschedule -> HANDOFFED forward
BE TIME_WAIT syn -> TIME_WAIT deliver
BE TIME_WAIT fin -> TIME_WAIT deliver
BE TIME_WAIT rst -> TIME_WAIT deliver
BE TIME_WAIT ack -> TIME_WAIT deliver
BE TIME_WAIT payload -> TIME_WAIT deliver
BE TIME_WAIT reschedule -> TIME_WAIT deliver
BE TIME_WAIT timer -> CLOSED none
`

// Every (role, state, event) is either the spec's transition or illegal.
func TestStepEveryTransition(t *testing.T) {
	want := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(spec), "\n") {
		from, to, _ := strings.Cut(l, " -> ")
		want[from] = to
	}
	legal := 0
	for _, role := range []Role{FE, BE} {
		for s := Closed; s < numStates; s++ {
			for ev := Event(1); ev < numEvents; ev++ {
				k := fmt.Sprintf("%v %v %v", role, s, ev)
				to, act, err := Step(role, s, ev)
				exp, ok := want[k]
				switch {
				case ok && err != nil:
					t.Errorf("%s: illegal, want -> %s", k, exp)
				case ok && fmt.Sprintf("%v %v", to, act) != exp:
					t.Errorf("%s -> %v %v, want %s", k, to, act, exp)
				case !ok && !errors.Is(err, ErrIllegal):
					t.Errorf("%s -> %v %v, want illegal", k, to, act)
				case !ok && to != s:
					t.Errorf("%s: an illegal event changed the state to %v", k, to)
				}
				if ok {
					legal++
				}
			}
		}
	}
	if legal != len(want) {
		t.Errorf("spec lists %d transitions, %d matched a real state/event", len(want), legal)
	}
}

func TestPacketEvent(t *testing.T) {
	cases := []struct {
		syn, fin, rst bool
		payload       int
		want          Event
	}{
		{false, false, false, 0, EvACK},
		{false, false, false, 10, EvPayload},
		{true, false, false, 0, EvSYN},
		{false, true, false, 0, EvFIN},
		{false, true, false, 5, EvFIN}, // data with FIN: the close matters
		{false, true, true, 0, EvRST},
		{true, false, true, 0, EvRST},
	}
	for _, tc := range cases {
		if got := PacketEvent(tc.syn, tc.fin, tc.rst, tc.payload); got != tc.want {
			t.Errorf("%+v: %v, want %v", tc, got, tc.want)
		}
	}
}

func TestLifecycle(t *testing.T) {
	tab := New()
	if err := tab.Begin(flow, t0); err != nil {
		t.Fatal(err)
	}
	if c, _ := tab.Get(flow); c.State != Handoffing {
		t.Fatalf("after Begin: %v", c.State)
	}
	if _, act, _ := tab.Observe(flow, EvACK, t0, t0); act != ActDrop {
		t.Errorf("HANDOFFING packet: %v, want drop", act)
	}
	replace, err := tab.Handed(flow, be1, t0.Add(300*time.Microsecond))
	if err != nil || replace {
		t.Fatalf("Handed: replace=%v err=%v", replace, err)
	}
	c, _ := tab.Get(flow)
	if c.State != Handoffed || c.BE != be1 || c.Latency != 300*time.Microsecond || !c.Forwarded {
		t.Fatalf("after Handed: %+v", c)
	}
	st, act, err := tab.Observe(flow, EvFIN, t0.Add(time.Second), t0.Add(11*time.Second))
	if err != nil || st != TimeWait || act != ActForward {
		t.Fatalf("FIN: %v %v %v", st, act, err)
	}
	// A retransmitted FIN does not move the deadline.
	tab.Observe(flow, EvFIN, t0.Add(5*time.Second), t0.Add(15*time.Second))
	if got := tab.Expired(t0.Add(10 * time.Second)); len(got) != 0 {
		t.Errorf("expired before its time: %v", got)
	}
	got := tab.Expired(t0.Add(11 * time.Second))
	if len(got) != 1 || got[0].Flow != flow || got[0].State != TimeWait {
		t.Errorf("expired = %v", got)
	}
	if tab.ExpireIf(flow, TimeWait, got[0].Since.Add(time.Nanosecond)) {
		t.Error("ExpireIf expired another instance")
	}
	if err := tab.Expire(flow); err != nil || tab.Len() != 0 {
		t.Errorf("Expire: %v, len %d", err, tab.Len())
	}
	if err := tab.Expire(flow); !errors.Is(err, ErrIllegal) {
		t.Errorf("Expire twice: %v", err)
	}
}

func TestIllegalTableEvents(t *testing.T) {
	tab := New()
	if _, err := tab.Handed(flow, be1, t0); !errors.Is(err, ErrIllegal) {
		t.Errorf("handed unknown: %v", err)
	}
	if _, err := tab.Failed(flow); !errors.Is(err, ErrIllegal) {
		t.Errorf("failed unknown: %v", err)
	}
	tab.Begin(flow, t0)
	if err := tab.Begin(flow, t0); !errors.Is(err, ErrIllegal) {
		t.Errorf("begin twice: %v", err)
	}
	if _, _, err := tab.Observe(flow, EvTimer, t0, t0); !errors.Is(err, ErrIllegal) {
		t.Errorf("timer in HANDOFFING: %v", err)
	}
	if c, _ := tab.Get(flow); c.State != Handoffing {
		t.Errorf("illegal events changed the state to %v", c.State)
	}
}

// A client that reuses its port while the old flow is still forwarded: the
// new handoff must replace the kernel's entry, and a failed one remove it.
func TestPortReuse(t *testing.T) {
	tab := New()
	tab.Begin(flow, t0)
	tab.Handed(flow, be1, t0)
	tab.Observe(flow, EvFIN, t0, t0.Add(time.Second))
	if err := tab.Begin(flow, t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	replace, err := tab.Handed(flow, netip.MustParseAddr("10.0.0.12"), t0.Add(time.Second))
	if err != nil || !replace {
		t.Errorf("replace = %v, %v", replace, err)
	}
	tab.Begin(flow, t0.Add(2*time.Second))
	stale, err := tab.Failed(flow)
	if err != nil || !stale {
		t.Errorf("stale = %v, %v", stale, err)
	}
	tab.Begin(flow, t0)
	if stale, _ := tab.Failed(flow); stale {
		t.Error("fresh flow reported stale forwarding")
	}
}

func TestAdoptAndCount(t *testing.T) {
	tab := New()
	tab.Begin(flow, t0)
	tab.Adopt(flow, be1, Handoffed, t0, t0)
	tab.Adopt(netip.MustParseAddrPort("10.0.0.10:1"), be1, TimeWait, t0, t0.Add(time.Second))
	if c, _ := tab.Get(flow); c.State != Handoffing {
		t.Error("Adopt replaced a live entry")
	}
	if n := tab.Count(); n[Handoffing] != 1 || n[TimeWait] != 1 {
		t.Errorf("count %v", n)
	}
	if s := tab.Snapshot(); len(s) != 2 || s[0].Client.Port() != 1 {
		t.Errorf("snapshot %+v", s)
	}
}

type unforwards struct {
	mu    sync.Mutex
	flows []netip.AddrPort
	// before runs as the kernel edit is about to be made, before still is
	// asked: what the handoffs did meanwhile.
	before func(netip.AddrPort)
}

func (u *unforwards) fn(ctx context.Context, f netip.AddrPort, still func() bool) error {
	if u.before != nil {
		u.before(f)
	}
	if still != nil && !still() {
		return ErrSkippedEdit
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.flows = append(u.flows, f)
	return nil
}

func (u *unforwards) got() []netip.AddrPort {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := append([]netip.AddrPort(nil), u.flows...)
	sort.Slice(out, func(i, j int) bool { return out[i].Compare(out[j]) < 0 })
	return out
}

// The reaper ends TIME_WAIT on time and idle flows after the idle timeout,
// on a fake clock.
func TestReaper(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tab := New()
		closing := netip.MustParseAddrPort("10.0.0.10:1")
		silent := netip.MustParseAddrPort("10.0.0.10:2")
		busy := netip.MustParseAddrPort("10.0.0.10:3")
		now := time.Now()
		for _, f := range []netip.AddrPort{closing, silent, busy} {
			tab.Begin(f, now)
			tab.Handed(f, be1, now)
		}
		tab.Observe(closing, EvFIN, now, now.Add(10*time.Second))
		var u unforwards
		r := &Reaper{
			Table: tab, Unforward: u.fn, Idle: time.Minute, Tick: time.Second, IdleEvery: 15 * time.Second,
			Alive: func(_ context.Context, f netip.AddrPort) (bool, error) { return f == busy, nil },
			Log:   slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go r.Run(ctx)

		time.Sleep(9500 * time.Millisecond)
		synctest.Wait()
		if got := u.got(); len(got) != 0 {
			t.Fatalf("before TIME_WAIT ended: %v", got)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if got := u.got(); !reflect.DeepEqual(got, []netip.AddrPort{closing}) {
			t.Fatalf("after TIME_WAIT: %v", got)
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		if got := u.got(); !reflect.DeepEqual(got, []netip.AddrPort{closing, silent}) {
			t.Fatalf("after idle: %v, want the silent flow gone and the busy one kept", got)
		}
		if _, ok := tab.Get(busy); !ok || tab.Len() != 1 {
			t.Errorf("table: %+v", tab.Snapshot())
		}
	})
}

// Idle expiry asks the kernel about each HANDOFFED flow about once an
// Idle, not about every flow every round: a flow found alive is asked
// again one Idle later, and expired then if its alive mark is gone.
func TestReaperIdleChecksIncremental(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tab := New()
		now := time.Now()
		var flows []netip.AddrPort
		for p := range uint16(100) {
			f := netip.AddrPortFrom(netip.MustParseAddr("10.0.0.10"), 1000+p)
			flows = append(flows, f)
			tab.Begin(f, now)
			tab.Handed(f, be1, now)
		}
		var mu sync.Mutex
		asked := map[netip.AddrPort]int{}
		quiet := false // after the first check every flow goes quiet
		var u unforwards
		r := &Reaper{
			Table: tab, Unforward: u.fn, Idle: time.Minute, Tick: time.Second, IdleEvery: time.Hour,
			Alive: func(_ context.Context, f netip.AddrPort) (bool, error) {
				mu.Lock()
				defer mu.Unlock()
				asked[f]++
				return !quiet, nil
			},
			Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go r.Run(ctx)
		time.Sleep(time.Minute + 30*time.Second)
		synctest.Wait()
		mu.Lock()
		total := 0
		for _, n := range asked {
			total += n
		}
		quiet = true
		mu.Unlock()
		if total != len(flows) || tab.Len() != len(flows) {
			t.Fatalf("90 s in: %d look-ups for %d flows (want one each), %d rows", total, len(flows), tab.Len())
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		if got := u.got(); len(got) != len(flows) || tab.Len() != 0 {
			t.Errorf("after going quiet: %d unforwarded, %d rows left", len(got), tab.Len())
		}
	})
}

func TestReconcile(t *testing.T) {
	t0 := time.Unix(1000, 0)
	snap := t0.Add(time.Second)
	be := netip.MustParseAddr("10.0.0.11")
	flow := func(p uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("10.0.0.10"), p) }
	tab := New()
	// 1: HANDOFFED and forwarded: kept.
	tab.Begin(flow(1), t0)
	tab.Handed(flow(1), be, t0)
	// 2: HANDOFFED but gone from the kernel: dropped.
	tab.Begin(flow(2), t0)
	tab.Handed(flow(2), be, t0)
	// 3: TIME_WAIT, gone from the kernel: dropped.
	tab.Begin(flow(3), t0)
	tab.Handed(flow(3), be, t0)
	tab.Observe(flow(3), EvFIN, t0, t0.Add(time.Minute))
	// 4: HANDOFFING, not forwarded yet: kept.
	tab.Begin(flow(4), t0)
	// 5: handed off after the snapshot began, absent from the read: kept.
	tab.Begin(flow(5), t0)
	tab.Handed(flow(5), be, snap.Add(time.Millisecond))
	kernel := map[netip.AddrPort]netip.Addr{flow(1): be, flow(4): be, flow(9): be} // 9: no row: an orphan
	stale, orphans := tab.Reconcile(kernel, snap)
	var flows []netip.AddrPort
	for _, e := range stale {
		flows = append(flows, e.Flow)
	}
	if fmt.Sprint(flows) != "[10.0.0.10:2 10.0.0.10:3]" {
		t.Errorf("stale %v", flows)
	}
	if fmt.Sprint(orphans) != "[10.0.0.10:9]" {
		t.Errorf("orphans %v", orphans)
	}
	// Reconcile only reports: the caller confirms and drops.
	if tab.Len() != 5 {
		t.Errorf("Reconcile changed the table: %d rows", tab.Len())
	}
	if tab.DropIf(stale[0].Flow, stale[0].State, stale[0].Since.Add(time.Nanosecond)) {
		t.Error("DropIf dropped another instance")
	}
	if !tab.DropIf(stale[0].Flow, stale[0].State, stale[0].Since) || tab.Live(be) != 2 {
		t.Errorf("DropIf: live %d", tab.Live(be))
	}
}

// Every IdleEvery the reaper reconciles: a row whose forwarding vanished is
// dropped, forwarding nobody tracks is removed.
func TestReaperReconciles(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tab := New()
		stale := netip.MustParseAddrPort("10.0.0.10:1")
		kept := netip.MustParseAddrPort("10.0.0.10:2")
		orphan := netip.MustParseAddrPort("10.0.0.10:3")
		now := time.Now()
		for _, f := range []netip.AddrPort{stale, kept} {
			tab.Begin(f, now)
			tab.Handed(f, be1, now)
		}
		// missed: forwarded, but the listing missed it (a dump beside a
		// transaction can): the look-up finds it, and the row stays.
		missed := netip.MustParseAddrPort("10.0.0.10:4")
		tab.Begin(missed, now)
		tab.Handed(missed, be1, now)
		var removed unforwards
		r := &Reaper{
			Table: tab, Unforward: new(unforwards).fn, Remove: removed.fn,
			Forwarded: func(context.Context) (map[netip.AddrPort]netip.Addr, error) {
				return map[netip.AddrPort]netip.Addr{kept: be1, orphan: be1}, nil
			},
			Forwarding: func(_ context.Context, f netip.AddrPort) (bool, error) { return f == missed, nil },
			Idle:       time.Hour, Tick: time.Second, IdleEvery: 15 * time.Second,
			Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go r.Run(ctx)
		time.Sleep(16 * time.Second)
		synctest.Wait()
		if got := removed.got(); !reflect.DeepEqual(got, []netip.AddrPort{orphan}) {
			t.Errorf("removed %v, want the untracked flow", got)
		}
		if _, ok := tab.Get(stale); ok {
			t.Error("a row whose forwarding vanished was kept")
		}
		if _, ok := tab.Get(kept); !ok {
			t.Error("a forwarded row was dropped")
		}
		if _, ok := tab.Get(missed); !ok {
			t.Error("a row the listing missed was dropped though the look-up found it")
		}
	})
}

// A client reuses its port while the reaper is ending the old connection's
// forwarding: the new connection's row and forwarding stay.
func TestReaperSparesReusedPort(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		tab := New()
		flow := netip.MustParseAddrPort("10.0.0.10:1")
		now := time.Now()
		tab.Begin(flow, now)
		tab.Handed(flow, be1, now)
		tab.Observe(flow, EvFIN, now, now.Add(time.Second))
		u := &unforwards{before: func(f netip.AddrPort) {
			// The new connection's SYN, request and handoff start now.
			if err := tab.Begin(f, time.Now()); err != nil {
				t.Error(err)
			}
		}}
		r := &Reaper{Table: tab, Unforward: u.fn, Idle: time.Hour, Tick: time.Second, IdleEvery: time.Hour,
			Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go r.Run(ctx)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if got := u.got(); len(got) != 0 {
			t.Errorf("the reused port's forwarding was removed: %v", got)
		}
		if c, ok := tab.Get(flow); !ok || c.State != Handoffing {
			t.Errorf("the new connection's row: %+v %v", c, ok)
		}
	})
}

// Live counts each BE's HANDOFFED connections through every way a row
// enters or leaves that state.
func TestLiveByBE(t *testing.T) {
	tab := New()
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	now := time.Now()
	flows := []netip.AddrPort{netip.MustParseAddrPort("10.0.0.10:1000"), netip.MustParseAddrPort("10.0.0.10:1001"),
		netip.MustParseAddrPort("10.0.0.10:1002")}
	for i, f := range flows {
		if err := tab.Begin(f, now); err != nil {
			t.Fatal(err)
		}
		be := be1
		if i == 2 {
			be = be2
		}
		// Offered to be2 first, then to be: it counts where it is offered.
		tab.Offering(f, be2)
		if got := tab.Live(be2); got != 1 {
			t.Errorf("flow %d offered to be2: be2 has %d", i, got)
		}
		tab.Offering(f, be)
		if _, err := tab.Handed(f, be, now); err != nil {
			t.Fatal(err)
		}
	}
	if tab.Live(be1) != 2 || tab.Live(be2) != 1 {
		t.Fatalf("after three handoffs: be1 %d be2 %d", tab.Live(be1), tab.Live(be2))
	}
	if _, _, err := tab.Observe(flows[0], EvFIN, now, now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if tab.Live(be1) != 1 {
		t.Errorf("after a FIN: be1 %d, want 1", tab.Live(be1))
	}
	// The port reused by a new connection no longer counts until handed.
	if err := tab.Begin(flows[1], now); err != nil {
		t.Fatal(err)
	}
	if tab.Live(be1) != 0 {
		t.Errorf("after a reuse: be1 %d, want 0", tab.Live(be1))
	}
	stale, _ := tab.Reconcile(map[netip.AddrPort]netip.Addr{}, now.Add(time.Second))
	for _, e := range stale {
		tab.DropIf(e.Flow, e.State, e.Since)
	}
	if tab.Live(be2) != 0 {
		t.Errorf("after the kernel lost be2's flow: %d", tab.Live(be2))
	}
	tab.Adopt(netip.MustParseAddrPort("10.0.0.10:2000"), be2, Handoffed, now, time.Time{})
	if tab.Live(be2) != 1 {
		t.Errorf("after an adoption: %d", tab.Live(be2))
	}
}

// A FIN that reaches the agent between the kernel's switch to forwarding
// and the table's is the only one it gets (the flow is marked closing):
// the handoff's end goes straight on to TIME_WAIT.
func TestFINWhileHandoffing(t *testing.T) {
	tab := New()
	flow := netip.MustParseAddrPort("10.0.0.10:1000")
	be := netip.MustParseAddr("10.0.0.11")
	now := time.Now()
	if err := tab.Begin(flow, now); err != nil {
		t.Fatal(err)
	}
	st, act, err := tab.Observe(flow, EvFIN, now, now.Add(5*time.Second))
	if err != nil || st != Handoffing || act != ActDrop {
		t.Fatalf("FIN while handoffing: %v %v %v", st, act, err)
	}
	if _, err := tab.Handed(flow, be, now); err != nil {
		t.Fatal(err)
	}
	c, _ := tab.Get(flow)
	if c.State != TimeWait || !c.Until.Equal(now.Add(5*time.Second)) || tab.Live(be) != 0 {
		t.Errorf("after the handoff: %+v, live %d", c, tab.Live(be))
	}
	// A reuse of the port starts clean.
	if err := tab.Begin(flow, now); err != nil {
		t.Fatal(err)
	}
	if _, err := tab.Handed(flow, be, now); err != nil {
		t.Fatal(err)
	}
	if c, _ := tab.Get(flow); c.State != Handoffed {
		t.Errorf("the next connection on the port: %v", c.State)
	}
}
