package register

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"tcpha/backends"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
	"tcpha/internal/testlog"
)

var vip = netip.MustParseAddr("10.0.0.100")

// fe runs an FE's registration port on loopback with a scheduler whose file
// has one catch-all rule.
func fe(t *testing.T, secret string, logs io.Writer) (netip.AddrPort, *backends.Scheduler) {
	return feGrace(t, secret, logs, 0)
}

func feGrace(t *testing.T, secret string, logs io.Writer, grace time.Duration) (netip.AddrPort, *backends.Scheduler) {
	t.Helper()
	def := backends.Server{Addr: netip.MustParseAddr("10.0.0.11"), Port: 666, Weight: 1}
	sched := backends.NewScheduler(backends.Table{Servers: []backends.Server{def},
		Rules: []backends.Rule{{Targets: []netip.Addr{def.Addr}, Pattern: re(".*")}}}, backends.Options{})
	sched.Session(def.Addr, true)
	log := slog.New(slog.NewTextHandler(logs, nil))
	rs := &Server{
		VIP: vip, Log: log, Grace: grace,
		Add: func(r backends.Registration) error {
			if err := sched.Register(r); err != nil {
				return err
			}
			sched.Session(r.Server.Addr, true)
			return nil
		},
		Remove: func(a netip.Addr) { sched.Deregister(a) },
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sv := &ctl.Server{
		Config: &ctl.Config{Secret: []byte(secret), Local: wire.Hello{Role: wire.RoleFE, Addr: netip.MustParseAddrPort("127.0.0.1:0"),
			VIP: netip.AddrPortFrom(vip, 80)}, Handler: rs, Log: log},
		Admit: rs.Admit,
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { sv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return netip.MustParseAddrPort(ln.Addr().String()), sched
}

func client(secret string, feAddr netip.AddrPort, logs io.Writer) *Client {
	log := slog.New(slog.NewTextHandler(logs, nil))
	return &Client{
		Config: &ctl.Config{Secret: []byte(secret), Log: log,
			Local: wire.Hello{Role: wire.RoleBE, Addr: netip.MustParseAddrPort("127.0.0.1:777"), VIP: netip.AddrPortFrom(vip, 0)}},
		Dial: ctl.Dialer(netip.Addr{}), FEs: []netip.AddrPort{feAddr}, Weight: 2,
		Rules: []backends.Rule{{Targets: []netip.Addr{netip.MustParseAddr("127.0.0.1")}, Pattern: re(`\.mp4$`)}},
		Log:   log,
	}
}

func waitRoute(t *testing.T, s *backends.Scheduler, path string, want []netip.AddrPort) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := s.Route(backends.Request{Path: path}).BEs
		if reflect.DeepEqual(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("route %s: %v, want %v", path, got, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitFor waits up to 5 s for cond, and fails the test naming what did
// not happen, with the FE's and the BE's logs.
func waitFor(t *testing.T, what string, cond func() bool, feLog, beLog *testlog.Buffer) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after 5 s still waiting for %s\nFE log:\n%s\nBE log:\n%s", what, feLog.String(), beLog.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A BE registers with its rules, is scheduled before the file's catch-all,
// and is taken out when it deregisters.
func TestRegisterAndDeregister(t *testing.T) {
	var feLog, beLog testlog.Buffer
	addr, sched := fe(t, "k", &feLog)
	c := client("k", addr, &beLog)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx, nil); close(done) }()
	self := netip.MustParseAddrPort("127.0.0.1:777")
	def := netip.MustParseAddrPort("10.0.0.11:666")
	waitRoute(t, sched, "/v.mp4", []netip.AddrPort{self, def})
	if st := sched.Statuses(); len(st) != 2 || st[1].Addr != "127.0.0.1" || st[1].Weight != 2 || !st[1].Registered {
		t.Errorf("registered BE: %+v", st)
	}
	cancel()
	<-done
	waitRoute(t, sched, "/v.mp4", []netip.AddrPort{def})
	if !strings.Contains(feLog.String(), "it deregistered") {
		t.Errorf("FE log:\n%s\nBE log:\n%s", feLog.String(), beLog.String())
	}
}

// A BE whose session ends without a word (it died) is taken out after the
// grace; one handed to a successor that registered meanwhile is not.
func TestSessionEndAndSuccessor(t *testing.T) {
	const grace = 100 * time.Millisecond
	var feLog, beLog testlog.Buffer
	addr, sched := feGrace(t, "k", &feLog, grace)
	self := netip.MustParseAddrPort("127.0.0.1:777")
	def := netip.MustParseAddrPort("10.0.0.11:666")
	stay := func() bool { return true }

	old := client("k", addr, &beLog)
	ctx1, cancel1 := context.WithCancel(context.Background())
	done1 := make(chan struct{})
	go func() { old.Run(ctx1, stay); close(done1) }()
	waitRoute(t, sched, "/v.mp4", []netip.AddrPort{self, def})
	// The successor registers, then the old one goes without deregistering.
	succ := client("k", addr, &beLog)
	ctx2, cancel2 := context.WithCancel(context.Background())
	done2 := make(chan struct{})
	go func() { succ.Run(ctx2, stay); close(done2) }()
	waitFor(t, "the successor's registration while the old session is up", func() bool {
		return strings.Count(feLog.String(), "BE registered") >= 2
	}, &feLog, &beLog)
	cancel1()
	<-done1
	time.Sleep(3 * grace)
	waitRoute(t, sched, "/v.mp4", []netip.AddrPort{self, def})
	// Now the successor dies too: its registration goes after the grace.
	cancel2()
	<-done2
	waitRoute(t, sched, "/v.mp4", []netip.AddrPort{def})
}

// A BE without the cluster's secret cannot register, and both ends log why.
func TestWrongSecretRefused(t *testing.T) {
	var feLog, beLog testlog.Buffer
	addr, sched := fe(t, "k", &feLog)
	c := client("other", addr, &beLog)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx, nil); close(done) }()
	waitFor(t, "the BE to log its failed registration", func() bool {
		return strings.Contains(beLog.String(), "registration failed")
	}, &feLog, &beLog)
	cancel()
	<-done
	if len(sched.Statuses()) != 1 {
		t.Errorf("a BE with the wrong secret registered: %+v", sched.Statuses())
	}
	if !strings.Contains(beLog.String(), "registration failed") || !strings.Contains(feLog.String(), "control session refused") {
		t.Errorf("logs:\nFE:\n%s\nBE:\n%s", feLog.String(), beLog.String())
	}
}

// A registration with a bad pattern is refused with the reason.
func TestBadRegistration(t *testing.T) {
	_, err := decode(netip.MustParseAddrPort("10.0.0.13:666"), func() []byte {
		b, _ := wire.Register{Weight: 1, Patterns: []string{"(unclosed"}}.MarshalBinary()
		return b
	}())
	if err == nil || !strings.Contains(err.Error(), "bad regular expression") {
		t.Errorf("bad pattern: %v", err)
	}
}

func re(s string) *regexp.Regexp { return regexp.MustCompile(s) }

// An adopted registration (an FE upgrade) stays while its BE registers
// again, and goes when it does not within twice the grace.
func TestAdopt(t *testing.T) {
	var logs testlog.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	be := netip.MustParseAddr("10.0.0.13")
	removed := make(chan netip.Addr, 2)
	rs := &Server{VIP: vip, Log: log, Grace: 50 * time.Millisecond,
		Remove: func(a netip.Addr) { removed <- a }}
	rs.Adopt(be)
	select {
	case a := <-removed:
		if a != be {
			t.Errorf("removed %v", a)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("an adopted registration nobody renewed stayed")
	}
	if !strings.Contains(logs.String(), "did not register again") {
		t.Errorf("log: %s", logs.String())
	}
	// Renewed in time: it stays.
	rs.mu.Lock()
	rs.owners = map[netip.Addr]*ctl.Session{be: nil}
	rs.mu.Unlock()
	rs.Adopt(be)
	select {
	case a := <-removed:
		t.Errorf("%v removed although it registered again", a)
	case <-time.After(300 * time.Millisecond):
	}
}
