package fe

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/google/nftables"

	"tcpha/backends"
	"tcpha/config"
	"tcpha/handoff"
	"tcpha/handoff/conntab"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
	"tcpha/metrics"
	"tcpha/nft"
)

var (
	be1 = netip.MustParseAddr("10.0.0.11")
	be2 = netip.MustParseAddr("10.0.0.12")
	vip = netip.MustParseAddrPort("10.0.0.100:80")
)

// fakeFlows is the FE's forwarding without a kernel: it logs the edits.
type fakeFlows struct {
	mu    sync.Mutex
	calls []string
	// stuck makes reads wait as a hung owner's would.
	stuck atomic.Bool
}

func (f *fakeFlows) log(s string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, s)
}

func (f *fakeFlows) Forward(_ context.Context, flow netip.AddrPort, be netip.Addr, replace bool) error {
	f.log("forward " + flow.String() + " " + be.String())
	return nil
}
func (f *fakeFlows) Unforward(_ context.Context, flow netip.AddrPort) error {
	f.log("unforward " + flow.String())
	return nil
}
func (f *fakeFlows) Run(ctx context.Context) { <-ctx.Done() }
func (f *fakeFlows) UnforwardIf(_ context.Context, flow netip.AddrPort, still func() bool) error {
	if !still() {
		return nft.ErrSkipped
	}
	f.log("unforward " + flow.String())
	return nil
}
func (f *fakeFlows) Remove(_ context.Context, flow netip.AddrPort, still func() bool) error {
	if still != nil && !still() { // nil: always, as nft.Flows
		return nft.ErrSkipped
	}
	f.log("remove " + flow.String())
	return nil
}
func (f *fakeFlows) Forwarded(ctx context.Context) (uint64, uint64, error) {
	if f.stuck.Load() {
		<-ctx.Done()
		return 0, 0, ctx.Err()
	}
	return 0, 0, nil
}
func (f *fakeFlows) Reinstall(context.Context, func(*nftables.Conn) (*nft.Ruleset, error)) error {
	f.log("reinstall")
	return nil
}

func (f *fakeFlows) Exec(context.Context, func(*nftables.Conn, *nft.Ruleset) error) error {
	f.log("exec")
	return nil
}

// fakeSets is the flow sets as the reaper reads them.
type fakeSets struct{}

func (fakeSets) Members(string) (map[netip.AddrPort]netip.Addr, error) {
	return map[netip.AddrPort]netip.Addr{}, nil
}
func (fakeSets) Has(string, netip.AddrPort) (bool, error) { return false, nil }

// fakePeers are BEs that answer probes with health.
type fakePeers struct {
	probes atomic.Int64
	health wire.Health
	check  atomic.Pointer[string] // the last probe's check
	mu     sync.Mutex
	resets []reset
	stats  wire.RelayStats
}

func (p *fakePeers) Offer(context.Context, netip.AddrPort, *wire.ConnInfo) (handoff.Offer, error) {
	return nil, errors.New("no offers here")
}
func (p *fakePeers) Probe(_ context.Context, _ netip.AddrPort, check []byte) (wire.Health, error) {
	p.probes.Add(1)
	s := string(check)
	p.check.Store(&s)
	return p.health, nil
}
func (p *fakePeers) Reset(_ context.Context, be, client netip.AddrPort) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.resets = append(p.resets, reset{be, client})
	return nil
}
func (p *fakePeers) Stats(context.Context, netip.AddrPort) (wire.RelayStats, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats, nil
}
func (p *fakePeers) Held(context.Context, netip.AddrPort) (map[netip.AddrPort]bool, error) {
	return map[netip.AddrPort]bool{}, nil
}

// testFE is an FE of two BEs (be2 takes .jpg, be1 the rest) with fakes
// where the kernel and the BEs would be.
func testFE(t *testing.T, dtc time.Duration) (*FE, *fakeFlows, *fakePeers) {
	t.Helper()
	cfg := &config.FE{
		VAddr: vip.Addr(), Port: vip.Port(), MaxHeader: 4096, DtcInterval: dtc, PHTTP: "multi",
		Rise: 1, Fall: 1, TimeWait: time.Second, IdleTimeout: time.Minute, HandoffTimeout: time.Second,
		Servers: []backends.Server{{Addr: be1, Port: 666, Weight: 1}, {Addr: be2, Port: 666, Weight: 1}},
		Rules: []backends.Rule{{Targets: []netip.Addr{be2}, Pattern: regexp.MustCompile(`\.jpg$`)},
			{Targets: []netip.Addr{be1}, Pattern: regexp.MustCompile(`.*`)}},
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	f := newFE(cfg, metrics.New(), log)
	flows, peers := &fakeFlows{}, &fakePeers{health: wire.Health{ServerUp: true}}
	f.flows, f.client = flows, peers
	f.reaper = f.newReaper(fakeSets{})
	f.pool = ctl.NewPool(&ctl.Config{Log: log}, nil, 1)
	t.Cleanup(f.pool.Close)
	for _, srv := range f.sched.Servers() {
		f.sched.Session(srv.Addr, true)
	}
	return f, flows, peers
}

// An FE started with dtcinterval = 0 probes nothing until tcphactl
// dtcinterval (or a reload) turns detection on; then it probes every BE
// at the new interval. Before, the detection loop was started only when
// dtcinterval was above 0 at start, so turning it on later did nothing.
func TestDetectionTurnedOnLater(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, _, peers := testFE(t, 0)
		ctx, cancel := context.WithCancel(context.Background())
		f.startLoops(ctx, ctx)
		time.Sleep(5 * time.Second)
		if n := peers.probes.Load(); n != 0 {
			t.Errorf("%d probes with detection off", n)
		}
		if _, err := f.Command("dtcinterval", []string{"1"}, io.Discard); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3500 * time.Millisecond)
		// Within a second of the change (off: look again every second),
		// then one round a second: both BEs, at least twice.
		if n := peers.probes.Load(); n < 4 {
			t.Errorf("%d probes in 3.5 s after dtcinterval 1 for two BEs, want at least 4", n)
		}
		cancel()
		f.loops.Wait()
	})
}

// tcphactl dtcinterval takes a duration of 0 (off) or more; a negative
// one is refused and changes nothing (it used to turn detection off
// silently).
func TestDtcintervalCommand(t *testing.T) {
	f, _, _ := testFE(t, 5*time.Second)
	var text strings.Builder
	for _, bad := range []string{"-5", "-1s", "soon", "2y"} {
		if _, err := f.Command("dtcinterval", []string{bad}, &text); err == nil || !strings.Contains(err.Error(), `dtcinterval "`+bad+`"`) {
			t.Errorf("dtcinterval %s: %v", bad, err)
		}
		if d := time.Duration(f.dtc.Load()); d != 5*time.Second {
			t.Errorf("after dtcinterval %s the interval is %v", bad, d)
		}
	}
	for arg, want := range map[string]time.Duration{"0": 0, "2": 2 * time.Second, "500ms": 500 * time.Millisecond} {
		if _, err := f.Command("dtcinterval", []string{arg}, &text); err != nil || time.Duration(f.dtc.Load()) != want {
			t.Errorf("dtcinterval %s: %v, interval %v", arg, err, time.Duration(f.dtc.Load()))
		}
	}
}

// A probe is good only when the BE answered, is not stopping, and its web
// server answers.
func TestJudge(t *testing.T) {
	down := errors.New("no session")
	for _, tc := range []struct {
		h    wire.Health
		err  error
		says string
	}{
		{wire.Health{ServerUp: true}, nil, ""},
		{wire.Health{ServerUp: true, Active: 7}, nil, ""},
		{wire.Health{ServerUp: true}, down, "no session"},
		{wire.Health{ServerUp: true, Draining: true}, nil, "stopping"},
		{wire.Health{ServerUp: false}, nil, "web server fails the check GET /h host=localhost expect=200-399"},
	} {
		err := judge(tc.h, tc.err, []byte("GET /h host=localhost expect=200-399"))
		if (err == nil) != (tc.says == "") || (err != nil && !strings.Contains(err.Error(), tc.says)) {
			t.Errorf("%+v, %v: %v, want %q", tc.h, tc.err, err, tc.says)
		}
	}
}

// The probes' verdicts reach the scheduler: fall failures make a BE
// unavailable, and the route then leaves it out.
func TestProbeMakesUnavailable(t *testing.T) {
	f, _, peers := testFE(t, time.Second)
	peers.health = wire.Health{ServerUp: false}
	f.probe(context.Background(), netip.AddrPortFrom(be2, 666), time.Second)
	if bes := f.sched.Route(backends.Request{Path: "/a.jpg"}).BEs; slices.ContainsFunc(bes, func(a netip.AddrPort) bool { return a.Addr() == be2 }) {
		t.Errorf("be2 still routed to after a failed probe (fall = 1): %v", bes)
	}
	peers.health = wire.Health{ServerUp: true}
	f.probe(context.Background(), netip.AddrPortFrom(be2, 666), time.Second)
	if bes := f.sched.Route(backends.Request{Path: "/a.jpg"}).BEs; len(bes) == 0 || bes[0].Addr() != be2 {
		t.Errorf("be2 not back after a good probe (rise = 1): %v", bes)
	}
}

// The move filter: a connection whose next request's first choice is its
// own BE stays; otherwise it goes to the route's other BEs, in order.
func TestMoveTargets(t *testing.T) {
	a1, a2, a3 := netip.AddrPortFrom(be1, 666), netip.AddrPortFrom(be2, 666), netip.MustParseAddrPort("10.0.0.13:666")
	for _, tc := range []struct {
		route []netip.AddrPort
		from  netip.Addr
		stay  bool
		bes   []netip.AddrPort
	}{
		{[]netip.AddrPort{a1, a2}, be1, true, nil},
		{[]netip.AddrPort{a2, a1, a3}, be1, false, []netip.AddrPort{a2, a3}},
		{[]netip.AddrPort{a2}, be1, false, []netip.AddrPort{a2}},
		{nil, be1, false, []netip.AddrPort{}},
	} {
		stay, bes := moveTargets(tc.route, tc.from)
		if stay != tc.stay || !slices.Equal(bes, tc.bes) {
			t.Errorf("%v from %v: stay %v %v, want %v %v", tc.route, tc.from, stay, bes, tc.stay, tc.bes)
		}
	}
}

// fakeMover records the migrations asked of it.
type fakeMover struct {
	bes []netip.AddrPort
	err error
}

func (m *fakeMover) Move(_ context.Context, ci *wire.ConnInfo, from netip.Addr, bes []netip.AddrPort) (netip.AddrPort, error) {
	m.bes = bes
	if m.err != nil || len(bes) == 0 {
		return netip.AddrPort{}, m.err
	}
	return bes[0], nil
}

// A BE's migrate request is answered by the FE's state and rules: busy
// while the FE starts or hands over, refused unless phttp = multi, stay
// when the request is the asking BE's, else moved to the rule's BE.
func TestMigrate(t *testing.T) {
	f, _, _ := testFE(t, 0)
	frame := func(path string) wire.Frame {
		ci := wire.ConnInfo{Client: netip.MustParseAddrPort("10.0.0.10:40000"), VIP: vip, MSS: 1460,
			RecvQueue: []byte("GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n")}
		p, err := ci.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return wire.Frame{Type: wire.TypeMigrate, ConnMagic: ci.ConnMagic(), Payload: p}
	}
	if res, _ := f.migrate(be1, frame("/a.jpg")); res != wire.ResultBusy {
		t.Errorf("without a mover: %v", res)
	}
	m := &fakeMover{}
	var mover Mover = m
	f.mover.Store(&mover)
	if res, _ := f.migrate(be2, frame("/a.jpg")); res != wire.ResultStay {
		t.Errorf("be2's own content: %v", res)
	}
	if res, why := f.migrate(be1, frame("/a.jpg")); res != wire.ResultOK || !slices.Equal(m.bes, []netip.AddrPort{netip.AddrPortFrom(be2, 666)}) {
		t.Errorf("be2's content from be1: %v %s, moved to %v", res, why, m.bes)
	}
	m.err = conntab.ErrNotForwarded
	if res, _ := f.migrate(be1, frame("/a.jpg")); res != wire.ResultUnknown {
		t.Errorf("a connection this FE does not forward: %v", res)
	}
	m.err = errors.New("be2 refused")
	if res, why := f.migrate(be1, frame("/a.jpg")); res != wire.ResultUpstream || why != "be2 refused" {
		t.Errorf("a move that failed: %v %s", res, why)
	}
	f.phttp.Store(uint32(wire.PHTTPForward))
	if res, _ := f.migrate(be1, frame("/a.jpg")); res != wire.ResultInvalid {
		t.Errorf("phttp = forward: %v", res)
	}
}

// At most maxMoves migrations run at once: one more is answered busy at
// once (the BE then serves the request itself), and counted.
func TestAdmitMoveBusy(t *testing.T) {
	f, _, _ := testFE(t, 0)
	var mover Mover = &fakeMover{}
	f.mover.Store(&mover)
	for range maxMoves {
		f.moves <- struct{}{}
	}
	var res wire.Result
	f.admitMove(be1, wire.Frame{Type: wire.TypeMigrate}, f.migrate, func(r wire.Result, _ string) { res = r })
	if res != wire.ResultBusy || f.notMoved.Load() != 1 {
		t.Errorf("a migration beyond maxMoves: %v, not moved %d", res, f.notMoved.Load())
	}
	<-f.moves
	done := make(chan wire.Result, 1)
	f.admitMove(be1, wire.Frame{Type: wire.TypeMigrate}, f.migrate, func(r wire.Result, _ string) { done <- r })
	if r := <-done; r != wire.ResultBadFrame {
		t.Errorf("an admitted migration of garbage: %v", r)
	}
}

// At the end of a drain each connection left is reset by the BE it was
// handed to; one whose BE is gone from the servers cannot be.
func TestResetPlan(t *testing.T) {
	c1 := netip.MustParseAddrPort("10.0.0.10:40001")
	c2 := netip.MustParseAddrPort("10.0.0.10:40002")
	c3 := netip.MustParseAddrPort("10.0.0.10:40003")
	left := []conntab.Conn{{Client: c1, BE: be1}, {Client: c2, BE: be2}, {Client: c3, BE: netip.MustParseAddr("10.0.0.99")}}
	resets, unknown := resetPlan(left, []backends.Server{{Addr: be1, Port: 666}, {Addr: be2, Port: 667}})
	want := []reset{{netip.AddrPortFrom(be1, 666), c1}, {netip.AddrPortFrom(be2, 667), c2}}
	if !slices.Equal(resets, want) || unknown != 1 {
		t.Errorf("resets %v, unknown %d; want %v, 1", resets, unknown, want)
	}
}

// A predecessor's forwarded flows are adopted HANDOFFED, those it had
// seen close in TIME_WAIT until timewait from now, so that the reaper ends
// their forwarding then.
func TestAdopt(t *testing.T) {
	open, closing := netip.MustParseAddrPort("10.0.0.10:40001"), netip.MustParseAddrPort("10.0.0.10:40002")
	tab := conntab.New()
	now := time.Now()
	adopt(tab, &nft.Carried{Found: true, Forward: map[netip.AddrPort]netip.Addr{open: be1, closing: be2},
		Closing: map[netip.AddrPort]bool{closing: true}}, 10*time.Second, now)
	got := map[netip.AddrPort]conntab.Conn{}
	for _, c := range tab.Snapshot() {
		got[c.Client] = c
	}
	if c := got[open]; c.State != conntab.Handoffed || c.BE != be1 {
		t.Errorf("open flow: %+v", c)
	}
	if c := got[closing]; c.State != conntab.TimeWait || c.BE != be2 {
		t.Errorf("closing flow: %+v", c)
	}
	if tab.Live(be1) != 1 || tab.Live(be2) != 0 {
		t.Errorf("live: be1 %d be2 %d, want 1 0", tab.Live(be1), tab.Live(be2))
	}
}

// A reload opens sessions to new servers and closes those to servers
// gone; a new weight keeps the sessions.
func TestSessionChanges(t *testing.T) {
	s1, s2, s3 := backends.Server{Addr: be1, Port: 666, Weight: 1}, backends.Server{Addr: be2, Port: 666, Weight: 1},
		backends.Server{Addr: netip.MustParseAddr("10.0.0.13"), Port: 666, Weight: 1}
	heavier := s2
	heavier.Weight = 5
	add, remove := sessionChanges([]backends.Server{s1, s2}, []backends.Server{heavier, s3})
	if !slices.Equal(add, []netip.AddrPort{heavier.AddrPort(), s3.AddrPort()}) || !slices.Equal(remove, []netip.AddrPort{s1.AddrPort()}) {
		t.Errorf("add %v remove %v", add, remove)
	}
}

// The reaper the FE wires ends a closed connection's forwarding through
// the FE's forwarding (the owner of the sets), once its TIME_WAIT is over.
func TestReaperWiring(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, flows, _ := testFE(t, 0)
		flow := netip.MustParseAddrPort("10.0.0.10:40001")
		now := time.Now()
		f.table.Adopt(flow, be1, conntab.TimeWait, now, now.Add(time.Second))
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { f.reaper.Run(ctx); close(done) }()
		time.Sleep(3 * time.Second)
		cancel()
		<-done
		flows.mu.Lock()
		defer flows.mu.Unlock()
		if !slices.Contains(flows.calls, "unforward "+flow.String()) {
			t.Errorf("forwarding edits %v, want the flow's forwarding ended", flows.calls)
		}
	})
}

// The watchdog's question: the FE is alive while its flow owner answers
// and its accept loop runs.
func TestAlive(t *testing.T) {
	f, flows, _ := testFE(t, 0)
	if err := f.Alive(t.Context()); err != nil {
		t.Fatalf("a serving FE: %v", err)
	}
	flows.stuck.Store(true)
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if err := f.Alive(ctx); err == nil || !strings.Contains(err.Error(), "flow owner") {
		t.Errorf("a hung flow owner: %v, want it named", err)
	}
	flows.stuck.Store(false)
	close(f.served)
	if err := f.Alive(t.Context()); err == nil || !strings.Contains(err.Error(), "no longer accepts") {
		t.Errorf("an ended accept loop: %v", err)
	}
}

// tcphactl drain and enable are logged in plain words (issue 18, item 7:
// the log said "BE enableed by the operator").
func TestDrainEnableLogged(t *testing.T) {
	f, _, _ := testFE(t, 0)
	var buf strings.Builder
	f.log = slog.New(slog.NewTextHandler(&buf, nil))
	for _, cmd := range []string{"drain", "enable"} {
		if _, err := f.Command(cmd, []string{be1.String()}, io.Discard); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []string{`msg="BE drained by the operator"`, `msg="BE enabled by the operator"`} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("log %q does not say %s", buf.String(), want)
		}
	}
}

// A BE whose sessions the FE closed itself (Release: a stop or an
// upgrade) is not a failure: no warning, while a lost session is one.
func TestReleaseLogsNoWarning(t *testing.T) {
	f, _, _ := testFE(t, 0)
	var buf strings.Builder
	f.log = slog.New(slog.NewTextHandler(&buf, nil))
	f.changed(be1, f.sched.Session, false, errors.New("control session closed"))
	if !strings.Contains(buf.String(), "level=WARN") {
		t.Errorf("a lost session logged no warning: %q", buf.String())
	}
	buf.Reset()
	f.Release()
	f.changed(be2, f.sched.Session, false, errors.New("control session closed"))
	if strings.Contains(buf.String(), "level=WARN") {
		t.Errorf("after Release: %q", buf.String())
	}
}

// tcphactl status names the VIP's TLS port when [fe] tlsport is on (it
// did not: an operator could not tell the FE took HTTPS); TestTLS reads it
// from a running FE.
func TestStatusTLSPort(t *testing.T) {
	for _, tc := range []struct {
		port uint16
		want string
	}{{0, "fe vip=" + vip.String() + " pid=7 "}, {443, "fe vip=" + vip.String() + " tls=" + vip.Addr().String() + ":443 pid=7 "}} {
		st := Status{VIP: vip.Addr().String(), Port: vip.Port(), TLSPort: tc.port}
		var b strings.Builder
		st.Write(&b, 7)
		if !strings.HasPrefix(b.String(), tc.want) {
			t.Errorf("tlsport %d: %q, want it to start %q", tc.port, b.String(), tc.want)
		}
	}
}

// A probe asks the BE for [fe] check, and a new one (Reload sets it)
// applies to the next probe.
func TestProbeAsksCheck(t *testing.T) {
	f, _, peers := testFE(t, time.Second)
	f.probe(context.Background(), netip.AddrPortFrom(be2, 666), time.Second)
	if got := *peers.check.Load(); got != "HEAD / host=localhost expect=200-399" {
		t.Errorf("default check asked: %q", got)
	}
	c, _ := backends.ParseCheck("GET /health host=www.example")
	c.Expect = backends.Expect{{Lo: 200, Hi: 204}}
	f.setCheck(c)
	f.probe(context.Background(), netip.AddrPortFrom(be2, 666), time.Second)
	if got := *peers.check.Load(); got != "GET /health host=www.example expect=200-204" {
		t.Errorf("check asked after a reload: %q", got)
	}
}
