package backends_test

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"tcpha/backends"
)

// beView is a BE's scheduler as be/cluster.go builds it from a cluster
// frame: every BE with a session, policy pol on a rule naming both BEs,
// the loads of the FE's view.
func beView(t *testing.T, pol string, w1, w2 int, loads map[netip.Addr]int) (*backends.Scheduler, netip.Addr, netip.Addr) {
	t.Helper()
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	both, err := backends.CompileRule([]netip.Addr{be1, be2}, false, pol, "", `.*`)
	if err != nil {
		t.Fatal(err)
	}
	jpg, _ := backends.CompileRule([]netip.Addr{be2}, false, "", "", `\.jpg$`)
	s := backends.NewScheduler(backends.Table{
		Servers: []backends.Server{{Addr: be1, Port: 666, Weight: w1}, {Addr: be2, Port: 666, Weight: w2}},
		Rules:   []backends.Rule{jpg, both}}, backends.Options{})
	for _, a := range []netip.Addr{be1, be2} {
		s.Session(a, true)
	}
	s.SetLoads(loads)
	return s, be1, be2
}

// What each policy does with a first request on the BE that accepted it
// (accept = be), given the FE's load view.
func TestFirstHere(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	for _, tc := range []struct {
		name     string
		pol      string
		w1, w2   int
		view     map[netip.Addr]int
		hereLoad int // be1's own
		path     string
		ok       bool
		to       []netip.Addr
	}{
		{"rr: the placement decided", "rr", 1, 1, map[netip.Addr]int{be2: 0}, 50, "/", true, nil},
		{"a rule not naming here", "wlc", 1, 1, nil, 0, "/a.jpg", false, nil},
		{"wlc: here is the least loaded", "wlc", 1, 1, map[netip.Addr]int{be2: 9}, 3, "/", true, nil},
		{"wlc: within one connection stays", "wlc", 1, 1, map[netip.Addr]int{be2: 4}, 5, "/", true, nil},
		{"wlc: the other is less loaded", "wlc", 1, 1, map[netip.Addr]int{be2: 2}, 10, "/", true, []netip.Addr{be2}},
		{"wlc: per weight", "wlc", 3, 1, map[netip.Addr]int{be2: 3}, 8, "/", true, nil},
		{"wlc: per weight, over", "wlc", 3, 1, map[netip.Addr]int{be2: 1}, 8, "/", true, []netip.Addr{be2}},
		{"lard: overloaded bound BE gives way", "lard", 1, 1, map[netip.Addr]int{be2: 2}, 2 * backends.LARDHigh, "/", true, []netip.Addr{be2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _, _ := beView(t, tc.pol, tc.w1, tc.w2, tc.view)
			ok, to := s.FirstHere(backends.Request{Path: tc.path}, be1, tc.hereLoad)
			if ok != tc.ok || !slices.Equal(to, tc.to) {
				t.Errorf("got %v %v, want %v %v", ok, to, tc.ok, tc.to)
			}
		})
	}

	// A BE the view says takes no connections (weight 0, no session) is
	// never chosen.
	s, _, _ := beView(t, "wlc", 1, 0, map[netip.Addr]int{be2: 0})
	if ok, to := s.FirstHere(backends.Request{Path: "/"}, be1, 100); !ok || to != nil {
		t.Errorf("weight 0: %v %v, want here", ok, to)
	}
}

// A stale view does not herd: be1, with 10 connections of its own, moves
// connections to be2 (2 in the view) only until its count of what it sent
// makes be2 as loaded; the next view starts afresh.
func TestFirstHereCountsItsMoves(t *testing.T) {
	s, be1, be2 := beView(t, "wlc", 1, 1, nil)
	s.SetLoads(map[netip.Addr]int{be2: 2})
	moved := 0
	for range 20 {
		if _, to := s.FirstHere(backends.Request{Path: "/"}, be1, 10); len(to) > 0 {
			moved++
		}
	}
	if moved != 7 { // be2 at 2 … 8; from 9 on, be1's 10 is within one
		t.Errorf("%d of 20 moved, want 7", moved)
	}
	s.SetLoads(map[netip.Addr]int{be2: 2})
	if _, to := s.FirstHere(backends.Request{Path: "/"}, be1, 10); !slices.Equal(to, []netip.Addr{be2}) {
		t.Errorf("after a new view: %v, want a move to be2", to)
	}
	if got := s.Load(be2); got != 3 {
		t.Errorf("be2's load after one move %d, want 3", got)
	}
}

// LARD binds content the same way on every BE: for each path exactly one
// of the two BEs serves it, whichever accepted the connection, about half
// the paths each for equal weights; an overloaded bound BE gives way.
func TestFirstHereLARDAgrees(t *testing.T) {
	s1, be1, be2 := beView(t, "lard", 1, 1, map[netip.Addr]int{})
	s2, _, _ := beView(t, "lard", 1, 1, map[netip.Addr]int{})
	on := map[netip.Addr]int{}
	for i := range 1000 {
		q := backends.Request{Host: "h", Path: fmt.Sprintf("/p%d", i)}
		_, to1 := s1.FirstHere(q, be1, 0)
		_, to2 := s2.FirstHere(q, be2, 0)
		s1.SetLoads(map[netip.Addr]int{be1: 0, be2: 0}) // no counting between paths
		s2.SetLoads(map[netip.Addr]int{be1: 0, be2: 0})
		switch {
		case to1 == nil && slices.Equal(to2, []netip.Addr{be1}):
			on[be1]++
		case to2 == nil && slices.Equal(to1, []netip.Addr{be2}):
			on[be2]++
		default:
			t.Fatalf("%s: be1 says %v, be2 says %v", q.Path, to1, to2)
		}
	}
	if on[be1] < 400 || on[be2] < 400 {
		t.Errorf("paths bound %v, want about half each", on)
	}
	// The same path again stays bound (its cache is there).
	q := backends.Request{Host: "h", Path: "/p1"}
	_, a := s1.FirstHere(q, be1, 0)
	s1.SetLoads(map[netip.Addr]int{be1: 0, be2: 0})
	_, b := s1.FirstHere(q, be1, 0)
	if !slices.Equal(a, b) {
		t.Errorf("/p1 bound %v then %v", a, b)
	}
	// lard counts no moves: many short connections for one path moved
	// within a view do not make its BE look overloaded.
	for i := range 100 {
		q := backends.Request{Host: "h", Path: fmt.Sprintf("/p%d", i)}
		s1.SetLoads(map[netip.Addr]int{be1: 0, be2: 0})
		_, first := s1.FirstHere(q, be1, 0)
		if first == nil {
			continue
		}
		for range 3 * backends.LARDHigh {
			if _, to := s1.FirstHere(q, be1, 0); !slices.Equal(to, first) {
				t.Fatalf("%s moved to %v after moves to %v", q.Path, to, first)
			}
		}
		break
	}
	// A path bound to be1 leaves it once be1 is overloaded.
	for i := range 100 {
		q := backends.Request{Host: "h", Path: fmt.Sprintf("/p%d", i)}
		s1.SetLoads(map[netip.Addr]int{be1: 0, be2: 0})
		if _, to := s1.FirstHere(q, be1, 0); to != nil {
			continue
		}
		if _, to := s1.FirstHere(q, be1, 2*backends.LARDHigh); !slices.Equal(to, []netip.Addr{be2}) {
			t.Errorf("%s on an overloaded be1: %v, want be2", q.Path, to)
		}
		break
	}
}
