package backends_test

import (
	"net/netip"
	"reflect"
	"testing"
	"time"

	"tcpha/backends"
)

const incidentFE = `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666
server = 10.0.0.12 777
rule = local ^/status$
rule = 10.0.0.12 \.jpg$
rule = 10.0.0.11,10.0.0.12 .*
`

// clock is a settable time for the BEs' state changes.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

// maint forces a BE down, whatever its probes say, until ready: no new
// connections (its rules fall through), and its downtime runs.
func TestMaintReady(t *testing.T) {
	clk := &clock{t: time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)}
	s := newScheduler(t, incidentFE, backends.Options{Now: clk.now})
	be2 := netip.MustParseAddr("10.0.0.12")
	clk.t = clk.t.Add(time.Minute)
	c, err := s.SetMaint(be2, true)
	if err != nil || !c.Changed || c.Available {
		t.Fatalf("maint: %+v %v", c, err)
	}
	if got := s.Route(req("/a.jpg")); !reflect.DeepEqual(got.BEs, []netip.AddrPort{be1}) {
		t.Errorf("a .jpg with be2 in maint: %+v", got)
	}
	if got := s.Named(req("/a.jpg")); len(got) != 1 || got[0] != be1.Addr() {
		t.Errorf("Named with be2 in maint: %v", got)
	}
	// Good probes do not bring it back.
	for range 5 {
		s.Probe(be2, true, 0, "", clk.t)
	}
	if s.Available(be2) {
		t.Error("probes brought a BE in maint back")
	}
	clk.t = clk.t.Add(30 * time.Second)
	st := status(t, s, be2)
	if !st.Maint || st.Available || !st.LastChange.Equal(clk.t.Add(-30*time.Second)) || st.Downtime != 30 {
		t.Errorf("in maint: %+v", st)
	}
	if c, _ := s.SetMaint(be2, false); !c.Changed || !c.Available {
		t.Errorf("ready: %+v", c)
	}
	clk.t = clk.t.Add(time.Hour)
	if st := status(t, s, be2); st.Maint || !st.Available || st.Downtime != 30 {
		t.Errorf("after ready: %+v", st)
	}
	if _, err := s.SetMaint(netip.MustParseAddr("10.0.0.99"), true); err == nil {
		t.Error("maint of an unknown BE")
	}
}

// A BE is down from when it is added until its session is up, and each
// change of availability is stamped.
func TestDowntime(t *testing.T) {
	clk := &clock{t: time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)}
	s := backends.NewScheduler(mustConfig(t, incidentFE).Table(), backends.Options{Now: clk.now, Fall: 1, Rise: 1})
	be1a := be1.Addr()
	clk.t = clk.t.Add(2 * time.Second)
	s.Session(be1a, true)
	clk.t = clk.t.Add(10 * time.Second)
	s.Probe(be1a, false, 0, "500", clk.t)
	clk.t = clk.t.Add(5 * time.Second)
	st := status(t, s, be1a)
	if st.Available || st.Downtime != 7 || !st.LastChange.Equal(clk.t.Add(-5*time.Second)) {
		t.Errorf("down: %+v", st)
	}
	s.Probe(be1a, true, 0, "", clk.t)
	clk.t = clk.t.Add(time.Minute)
	if st := status(t, s, be1a); !st.Available || st.Downtime != 7 {
		t.Errorf("up again: %+v", st)
	}
	// Cleared, a BE that is down counts from the clearing.
	s.Probe(be1a, false, 0, "x", clk.t)
	clk.t = clk.t.Add(4 * time.Second)
	s.ClearCounters()
	clk.t = clk.t.Add(3 * time.Second)
	if st := status(t, s, be1a); st.Downtime != 3 {
		t.Errorf("after clear counters: %+v", st)
	}
}

// Each rule counts the requests it routed: the first rule that gives
// BEs, or a local rule first. Counts survive a rebuild that keeps the
// rule, and clear counters zeroes them with the BEs' counters.
func TestRuleHits(t *testing.T) {
	s := newScheduler(t, incidentFE, backends.Options{})
	for _, p := range []string{"/status", "/a.jpg", "/b.jpg", "/x", "/status", "/y", "/z"} {
		s.Route(req(p))
	}
	hits := func() []int64 {
		var h []int64
		for _, r := range s.Rules() {
			h = append(h, r.Hits)
		}
		return h
	}
	if got := hits(); !reflect.DeepEqual(got, []int64{2, 2, 3}) {
		t.Errorf("hits %v, want [2 2 3]", got)
	}
	rs := s.Rules()
	if rs[1].Line != 6 || rs[1].Targets != "10.0.0.12" || rs[1].Pattern != `\.jpg$` || rs[1].Scheduler != "rr" ||
		rs[0].Targets != "local" || rs[0].Scheduler != "" || rs[2].Targets != "10.0.0.11,10.0.0.12" {
		t.Errorf("rules: %+v", rs)
	}
	// A registration rebuilds the rules; the file's keep their counts.
	err := s.Register(backends.Registration{Server: backends.Server{Addr: netip.MustParseAddr("10.0.0.13"), Port: 666, Weight: 1},
		Rules: []backends.Rule{{Targets: []netip.Addr{netip.MustParseAddr("10.0.0.13")}}}})
	if err != nil {
		t.Fatal(err)
	}
	if got := hits(); !reflect.DeepEqual(got, []int64{0, 2, 2, 3}) {
		t.Errorf("hits after a registration %v, want [0 2 2 3]", got)
	}
	if !s.Rules()[0].Registered || s.Rules()[1].Registered {
		t.Errorf("registered: %+v", s.Rules())
	}
	s.Handed(be1.Addr())
	s.Failed(be1.Addr())
	s.ClearCounters()
	if got := hits(); !reflect.DeepEqual(got, []int64{0, 0, 0, 0}) {
		t.Errorf("hits after clear counters %v", got)
	}
	if st := status(t, s, be1.Addr()); st.Handoffs != 0 || st.Failures != 0 {
		t.Errorf("BE counters after clear counters: %+v", st)
	}
}

func status(t *testing.T, s *backends.Scheduler, a netip.Addr) backends.Status {
	t.Helper()
	for _, st := range s.Statuses() {
		if st.Server.Addr == a {
			return st
		}
	}
	t.Fatalf("%v not listed", a)
	return backends.Status{}
}
