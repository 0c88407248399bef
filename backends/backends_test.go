package backends_test

import (
	"fmt"
	"net/netip"
	"reflect"
	"regexp"
	"slices"
	"testing"
	"time"

	"tcpha/backends"
	"tcpha/config"
)

func mustConfig(t testing.TB, text string) *config.FE {
	t.Helper()
	// An FE with servers needs the cluster's secret; after the [fe] text,
	// so that its line numbers stay.
	c, err := config.Parse("t.conf", []byte(text+"\n[global]\nsecret = test-secret-16byte\n"))
	if err != nil {
		t.Fatal(err)
	}
	return c.FE
}

// newScheduler schedules by the [fe] text with every BE's session up.
func newScheduler(t testing.TB, text string, opt backends.Options) *backends.Scheduler {
	t.Helper()
	s := backends.NewScheduler(mustConfig(t, text).Table(), opt)
	for _, srv := range s.Servers() {
		if _, err := s.Session(srv.Addr, true); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

var (
	be1 = netip.MustParseAddrPort("10.0.0.11:666")
	be2 = netip.MustParseAddrPort("10.0.0.12:777")
	be3 = netip.MustParseAddrPort("10.0.0.13:666")
)

func TestRoute(t *testing.T) {
	s := newScheduler(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666
server = 10.0.0.12 777
rule = local ^/status$
rule = 10.0.0.12 \.jpg$
rule = local ^/img/
rule = 10.0.0.11 ^/img/
rule = 10.0.0.11 ^/a
rule = 10.0.0.12 ^/a
`, backends.Options{})
	cases := []struct {
		path string
		want backends.Route
	}{
		{"/status", backends.Route{Local: true}},                                     // local first: no BE tried
		{"/img/a.jpg", backends.Route{BEs: []netip.AddrPort{be2, be1}, Local: true}}, // local is the fallback
		{"/a.jpg", backends.Route{BEs: []netip.AddrPort{be2, be1}}},                  // be2 listed once although two rules name it
		{"/img/b.png", backends.Route{Local: true}},
		{"/other", backends.Route{}}, // no rule matches: the FE answers 503
	}
	for _, tc := range cases {
		if got := s.Route(req(tc.path)); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %+v, want %+v", tc.path, got, tc.want)
		}
	}
	// be2 without a session: the next matching rule, `local ^/img/`, is
	// now the first choice.
	if c, _ := s.Session(be2.Addr(), false); !c.Changed || c.Available {
		t.Errorf("losing the session: %+v", c)
	}
	if got := s.Route(req("/img/a.jpg")); !reflect.DeepEqual(got, backends.Route{Local: true}) {
		t.Errorf("be2 unavailable: %+v", got)
	}
	// Named lists the BEs the matching rules name, usable or not, up to
	// the first matching local rule.
	for path, want := range map[string][]netip.Addr{
		"/img/a.jpg": {be2.Addr()},             // `local ^/img/` ends the list
		"/a.jpg":     {be2.Addr(), be1.Addr()}, // be2, out, still named; once
		"/status":    nil,
		"/other":     nil,
	} {
		if got := s.Named(req(path)); !slices.Equal(got, want) {
			t.Errorf("Named(%s) = %v, want %v", path, got, want)
		}
	}
}

// Fall bad probes in a row make a BE unavailable, Rise good ones available
// again; each change is reported once.
func TestRiseAndFall(t *testing.T) {
	s := newScheduler(t, "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.11 .*\n",
		backends.Options{Rise: 2, Fall: 3})
	now := time.Unix(1000, 0)
	probe := func(ok bool) backends.Change {
		t.Helper()
		c, err := s.Probe(be1.Addr(), ok, 0, "", now)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	probe(false)
	probe(false)
	if !s.Available(be1.Addr()) {
		t.Fatal("unavailable after two failures; fall is 3")
	}
	if c := probe(false); !c.Changed || c.Available {
		t.Errorf("third failure: %+v", c)
	}
	if got := s.Route(req("/x")); len(got.BEs) != 0 {
		t.Errorf("an unavailable BE was routed to: %+v", got)
	}
	if c := probe(false); c.Changed {
		t.Error("a fourth failure reported a change")
	}
	if c := probe(true); c.Changed || s.Available(be1.Addr()) {
		t.Error("available after one good probe; rise is 2")
	}
	probe(false) // a failure resets the good count
	probe(true)
	if c := probe(true); !c.Changed || !c.Available {
		t.Errorf("two good probes: %+v", c)
	}
	if _, err := s.Probe(netip.MustParseAddr("10.9.9.9"), true, 0, "", now); err == nil {
		t.Error("a probe of an unknown BE was accepted")
	}
}

// Round robin splits by weight, exactly; a drained BE and one of weight 0
// take nothing, and the rest of the rule's BEs follow the choice.
func TestRoundRobinWeights(t *testing.T) {
	s := newScheduler(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666 weight=3
server = 10.0.0.12 777
server = 10.0.0.13 666 weight=0
rule = 10.0.0.11,10.0.0.12,10.0.0.13 .*
`, backends.Options{})
	count := map[netip.AddrPort]int{}
	for range 4000 {
		r := s.Route(req("/x"))
		if len(r.BEs) != 2 {
			t.Fatalf("route %+v: want both usable BEs", r)
		}
		count[r.BEs[0]]++
	}
	if count[be1] != 3000 || count[be2] != 1000 || count[be3] != 0 {
		t.Errorf("split %v, want 3000:1000:0", count)
	}
	if err := s.SetDraining(be1.Addr(), true); err != nil {
		t.Fatal(err)
	}
	if r := s.Route(req("/x")); !reflect.DeepEqual(r.BEs, []netip.AddrPort{be2}) {
		t.Errorf("be1 draining: %+v", r)
	}
	s.SetDraining(be1.Addr(), false)
	if err := s.SetWeight(be3.Addr(), 1); err != nil {
		t.Fatal(err)
	}
	if r := s.Route(req("/x")); len(r.BEs) != 3 {
		t.Errorf("be3 given a weight: %+v", r)
	}
	if err := s.SetWeight(be3.Addr(), -1); err == nil {
		t.Error("a negative weight was accepted")
	}
}

// wlc sends each connection to the BE with the fewest for its weight, and
// splits by weight when loads are equal.
func TestWLC(t *testing.T) {
	live := map[netip.Addr]int{}
	s := newScheduler(t, `[fe]
vaddr = 10.0.0.100
scheduler = wlc
server = 10.0.0.11 666 weight=2
server = 10.0.0.12 777
rule = 10.0.0.11,10.0.0.12 .*
`, backends.Options{Live: func(a netip.Addr) int { return live[a] }})
	live[be1.Addr()], live[be2.Addr()] = 10, 4 // 5 per weight against 4
	if r := s.Route(req("/x")); r.BEs[0] != be2 {
		t.Errorf("with be2 less loaded per weight: %+v", r)
	}
	live[be1.Addr()] = 6 // 3 per weight
	if r := s.Route(req("/x")); r.BEs[0] != be1 {
		t.Errorf("with be1 less loaded per weight: %+v", r)
	}
	// A probe reports more than this FE sees: other FEs' connections.
	s.Probe(be1.Addr(), true, 100, "", time.Now())
	if r := s.Route(req("/x")); r.BEs[0] != be2 {
		t.Errorf("with be1 loaded by other FEs: %+v", r)
	}
	s.Probe(be1.Addr(), true, 0, "", time.Now())
	clear(live)
	count := map[netip.AddrPort]int{}
	for range 300 {
		count[s.Route(req("/x")).BEs[0]]++
	}
	if count[be1] != 200 || count[be2] != 100 {
		t.Errorf("equal loads: split %v, want 200:100", count)
	}
	// One connection more, a close not seen yet, is still a tie; two are not.
	live[be1.Addr()] = 1
	clear(count)
	for range 300 {
		count[s.Route(req("/x")).BEs[0]]++
	}
	if count[be1] != 200 || count[be2] != 100 {
		t.Errorf("be1 one connection ahead: split %v, want 200:100", count)
	}
	live[be1.Addr()] = 2
	if r := s.Route(req("/x")); r.BEs[0] != be2 {
		t.Errorf("be1 two connections ahead: %+v", r)
	}
}

// LARD binds each path to one BE, so that its cache serves it, and moves a
// path only when its BE is overloaded.
func TestLARD(t *testing.T) {
	live := map[netip.Addr]int{}
	s := newScheduler(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666
server = 10.0.0.12 777
rule = 10.0.0.11,10.0.0.12 scheduler=lard .*
`, backends.Options{Live: func(a netip.Addr) int { return live[a] }})
	bound := map[string]netip.AddrPort{}
	perBE := map[netip.AddrPort]int{}
	for round := range 5 {
		for i := range 200 {
			path := fmt.Sprintf("/obj/%d", i)
			got := s.Route(req(path)).BEs[0]
			if round == 0 {
				bound[path] = got
				perBE[got]++
				live[got.Addr()] = (live[got.Addr()] + 1) % 20 // light load
			} else if got != bound[path] {
				t.Fatalf("round %d: %s went to %v, first to %v", round, path, got, bound[path])
			}
		}
	}
	if perBE[be1] < 50 || perBE[be2] < 50 {
		t.Errorf("paths per BE %v: the first assignments should spread", perBE)
	}
	// be1 overloaded, be2 idle: be1's paths move.
	live[be1.Addr()], live[be2.Addr()] = backends.LARDHigh+1, 0
	var moved string
	for path, b := range bound {
		if b == be1 {
			moved = path
			break
		}
	}
	if got := s.Route(req(moved)).BEs[0]; got != be2 {
		t.Errorf("%s stayed on its overloaded BE", moved)
	}
	live[be1.Addr()] = 0
	if got := s.Route(req(moved)).BEs[0]; got != be2 {
		t.Errorf("%s moved back without cause", moved)
	}
}

// Registered BEs come and go without touching the file's servers; their
// rules come before the file's, whose catch-all would leave them nothing.
// A reload keeps them, and keeps every BE's state.
func TestRegistrationAndReload(t *testing.T) {
	text := "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.11 .*\n"
	s := newScheduler(t, text, backends.Options{})
	reg := mustConfig(t, "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.13 666\nrule = 10.0.0.13 \\.mp4$\n")
	if err := s.Register(backends.Registration{Server: reg.Servers[0], Rules: reg.Rules}); err != nil {
		t.Fatal(err)
	}
	s.Session(be3.Addr(), true)
	if r := s.Route(req("/v.mp4")); !reflect.DeepEqual(r.BEs, []netip.AddrPort{be3, be1}) {
		t.Errorf("registered rule: %+v", r)
	}
	if err := s.Register(backends.Registration{Server: backends.Server{Addr: be1.Addr(), Port: 666, Weight: 1}}); err == nil {
		t.Error("a configured BE registered")
	}
	bad := backends.Registration{Server: reg.Servers[0], Rules: mustConfig(t, text).Rules}
	if err := s.Register(bad); err == nil {
		t.Error("a registration with another BE's rule was accepted")
	}
	// A reload with a new rule: be1 keeps its state (drained), be3 stays.
	s.SetDraining(be1.Addr(), true)
	s.SetTable(mustConfig(t, text+"server = 10.0.0.12 777\nrule = 10.0.0.12 ^/new\n").Table())
	s.Session(be2.Addr(), true)
	if r := s.Route(req("/new")); !reflect.DeepEqual(r.BEs, []netip.AddrPort{be2}) {
		t.Errorf("after the reload: %+v", r)
	}
	if r := s.Route(req("/v.mp4")); !reflect.DeepEqual(r.BEs, []netip.AddrPort{be3}) {
		t.Errorf("registration after the reload: %+v", r)
	}
	if !s.Deregister(be3.Addr()) || s.Deregister(be3.Addr()) {
		t.Error("deregistering twice")
	}
	if r := s.Route(req("/v.mp4")); len(r.BEs) != 0 {
		t.Errorf("after deregistration: %+v", r)
	}
	if n := len(s.Statuses()); n != 2 {
		t.Errorf("%d BEs listed, want 2", n)
	}
}

// Effective is what BEs get to route later requests: registered rules
// first; Holds tells a BE whether a request is its own to serve.
func TestEffectiveAndHolds(t *testing.T) {
	s := newScheduler(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666 weight=2
server = 10.0.0.12 777
rule = 10.0.0.12 \.jpg$
rule = 10.0.0.11,10.0.0.12 .*
`, backends.Options{})
	re := regexp.MustCompile(`\.txt$`)
	if err := s.Register(backends.Registration{Server: backends.Server{Addr: be3.Addr(), Port: 666, Weight: 1},
		Rules: []backends.Rule{{Targets: []netip.Addr{be3.Addr()}, Pattern: re}}}); err != nil {
		t.Fatal(err)
	}
	s.Session(be3.Addr(), true)
	tab := s.Effective()
	if len(tab.Servers) != 3 || len(tab.Rules) != 3 || tab.Rules[0].Pattern != re || tab.Servers[0].Weight != 2 {
		t.Errorf("effective table: %+v", tab)
	}
	for _, tc := range []struct {
		path string
		be   netip.AddrPort
		want bool
	}{
		{"/a.jpg", be2, true}, {"/a.jpg", be1, false}, {"/a.html", be1, true}, {"/a.html", be2, true},
		{"/a.txt", be1, false},
	} {
		if got := s.Holds(req(tc.path), tc.be.Addr()); got != tc.want {
			t.Errorf("Holds(%s, %v) = %v", tc.path, tc.be, got)
		}
	}
	// be3 unusable: its rule is skipped, and .txt is the catch-all's.
	s.SetDraining(be3.Addr(), true)
	if !s.Holds(req("/a.txt"), be1.Addr()) {
		t.Error("with be3 draining, be1 does not hold .txt")
	}
}

func req(path string) backends.Request { return backends.Request{Path: path} }

// Host rules (issue 16): whole-host, case-insensitive matches, first match
// in file order; a host-only rule takes every path; a request without a
// host matches no host rule; LARD keeps the same path of two sites apart.
func TestRouteByHost(t *testing.T) {
	s := newScheduler(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666
server = 10.0.0.12 777
server = 10.0.0.13 666
rule = 10.0.0.12 host=img\.example\.com
rule = 10.0.0.13 host=(www\.)?example\.com ^/api/
rule = 10.0.0.11,10.0.0.13 scheduler=lard host=.*\.example\.org
rule = 10.0.0.11 .*
`, backends.Options{})
	for _, c := range []struct {
		host, path string
		want       netip.AddrPort
	}{
		{"img.example.com", "/index.html", be2},
		{"IMG.Example.COM", "/a.jpg", be2},
		{"img.example.com.evil", "/a.jpg", be1}, // whole host only
		{"evilimg.example.com", "/a.jpg", be1},
		{"example.com", "/api/x", be3},
		{"www.example.com", "/api/x", be3},
		{"www.example.com", "/index.html", be1}, // host matches, path does not
		{"", "/api/x", be1},                     // no host: no host rule
	} {
		r := s.Route(backends.Request{Host: c.host, Path: c.path})
		if len(r.BEs) == 0 || r.BEs[0] != c.want {
			t.Errorf("%s %s: %+v, want %v first", c.host, c.path, r.BEs, c.want)
		}
	}
	if !s.Holds(backends.Request{Host: "img.example.com", Path: "/x"}, be2.Addr()) ||
		s.Holds(backends.Request{Host: "www.example.com", Path: "/x"}, be2.Addr()) {
		t.Error("Holds does not follow the host")
	}
	if got := s.Named(backends.Request{Host: "a.example.org", Path: "/"}); !slices.Equal(got, []netip.Addr{be1.Addr(), be3.Addr()}) {
		t.Errorf("Named: %v", got)
	}
	// LARD binds /p of one site and /p of another separately.
	a := s.Route(backends.Request{Host: "a.example.org", Path: "/p"}).BEs[0]
	b := s.Route(backends.Request{Host: "b.example.org", Path: "/p"}).BEs[0]
	if a == b {
		t.Errorf("the same path of two sites went to one BE (%v): LARD keyed by path alone", a)
	}
}

// A TLS connection (issue 16) is routed by its SNI alone: its path is
// encrypted, so path patterns are not consulted; without SNI it goes to the
// first rule without host=, even past a host= pattern that matches "".
func TestRouteTLS(t *testing.T) {
	s := newScheduler(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666
server = 10.0.0.12 777
server = 10.0.0.13 666
rule = 10.0.0.12 host=.*
rule = 10.0.0.13 host=b\.example ^/api/
rule = 10.0.0.11 ^/only-this$
`, backends.Options{})
	for _, c := range []struct {
		sni  string
		want netip.AddrPort
	}{
		{"a.example", be2}, // host=.* takes every name
		{"", be1},          // no SNI: not host=.*, and the path rule takes it whatever its pattern
	} {
		r := s.Route(backends.Request{Host: c.sni, TLS: true})
		if len(r.BEs) == 0 || r.BEs[0] != c.want {
			t.Errorf("SNI %q: %+v, want %v first", c.sni, r.BEs, c.want)
		}
	}
	s = newScheduler(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666
server = 10.0.0.13 666
rule = 10.0.0.13 host=b\.example ^/api/
rule = 10.0.0.11 .*
`, backends.Options{})
	if r := s.Route(backends.Request{Host: "b.example", TLS: true}); len(r.BEs) == 0 || r.BEs[0] != be3 {
		t.Errorf("b.example: %+v: the path pattern ^/api/ was consulted for TLS", r.BEs)
	}
}

// First is the rule that decides: later matching rules do not count.
func TestFirst(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	jpg, _ := backends.CompileRule([]netip.Addr{be2}, false, "", "", `\.jpg$`)
	all, _ := backends.CompileRule([]netip.Addr{be1}, false, "", "", `.*`)
	s := backends.NewScheduler(backends.Table{Servers: []backends.Server{{Addr: be1, Port: 666, Weight: 1}, {Addr: be2, Port: 666, Weight: 1}},
		Rules: []backends.Rule{jpg, all}}, backends.Options{})
	if got := s.First(backends.Request{Path: "/a.jpg"}); !slices.Equal(got, []netip.Addr{be2}) {
		t.Errorf("/a.jpg: %v, want only be2 (Named gives %v)", got, s.Named(backends.Request{Path: "/a.jpg"}))
	}
	if got := s.First(backends.Request{Path: "/"}); !slices.Equal(got, []netip.Addr{be1}) {
		t.Errorf("/: %v", got)
	}
}
