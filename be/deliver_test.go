package be

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"tcpha/handoff/transplant"
	"tcpha/handoff/wire"
)

// A connection goes to the web server's socket only while the server may
// serve all its later requests: phttp = single, no cluster frame yet, or
// an FE whose only server is this BE.
func TestDeliverable(t *testing.T) {
	self, other := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	cluster := func(mode wire.PHTTP, servers ...netip.Addr) *beCluster {
		c := wire.Cluster{PHTTP: mode}
		for _, s := range servers {
			c.Servers = append(c.Servers, wire.ClusterServer{Addr: s, Port: 666, Weight: 1})
		}
		c.Rules = []wire.ClusterRule{{Targets: servers, Pattern: ".*"}}
		b, err := c.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		bc, err := clusterOf(b)
		if err != nil {
			t.Fatal(err)
		}
		return bc
	}
	for _, c := range []struct {
		name string
		c    *beCluster
		want string
	}{
		{"no cluster frame", nil, ""},
		{"single", cluster(wire.PHTTPSingle, self, other), ""},
		{"multi, two BEs", cluster(wire.PHTTPMulti, self, other), resultPHTTP},
		{"forward, two BEs", cluster(wire.PHTTPForward, self, other), resultPHTTP},
		{"multi, only this BE", cluster(wire.PHTTPMulti, self), ""},
	} {
		if got := deliverable(c.c, self); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

// Another idle connection is tried only when the server closed this one
// (a reload) and nothing was done to it.
func TestRetryable(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{&transplant.Error{Reason: transplant.ReasonWorkerGone, Server: transplant.ServerIntact}, true},
		{fmt.Errorf("stage: %w", &transplant.Error{Reason: transplant.ReasonFDChanged, Server: transplant.ServerIntact}), true},
		{&transplant.Error{Reason: transplant.ReasonRestore, Server: transplant.ServerClosed}, false},
		{&transplant.Error{Reason: transplant.ReasonDenied, Server: transplant.ServerIntact}, false},
		{errors.New("other"), false},
	} {
		if got := retryable(c.err); got != c.want {
			t.Errorf("retryable(%v) = %v", c.err, got)
		}
	}
}

// Failures that repeat pause preparations at once; a late accept only
// when it keeps happening.
func TestShouldPause(t *testing.T) {
	for _, r := range []transplant.Reason{transplant.ReasonDial, transplant.ReasonNoWorker, transplant.ReasonDenied, transplant.ReasonDeferred} {
		if !shouldPause(r, 1, false) {
			t.Errorf("%v, first failure: no pause", r)
		}
	}
	if shouldPause(transplant.ReasonNotAccepted, 1, false) || shouldPause(transplant.ReasonNotInEpoll, pauseAfter-1, false) {
		t.Error("a single late accept paused deliveries")
	}
	if !shouldPause(transplant.ReasonNotAccepted, pauseAfter, false) {
		t.Errorf("%d late accepts in a row: no pause", pauseAfter)
	}
	if shouldPause(transplant.ReasonDial, 1, true) || !shouldPause(transplant.ReasonDial, pauseAfter, true) {
		t.Error("a dial from one client's address paused deliveries, or repeated ones did not")
	}
}

func TestReasonOfPaused(t *testing.T) {
	if got := reasonOf(&pausedError{reason: "deferred"}); got != "deferred" {
		t.Errorf("paused: %q", got)
	}
	if got := reasonOf(&transplant.Error{Reason: transplant.ReasonEpollAdd}); got != "epoll_add" {
		t.Errorf("transplant error: %q", got)
	}
}

func TestFormatCounts(t *testing.T) {
	got := formatCounts(map[string]int64{"delivered": 7, "worker_gone": 2, "phttp": 1, "dial": 0})
	if want := "delivered=7 relayed=3 relayed_phttp=1 relayed_worker_gone=2"; got != want {
		t.Errorf("%q, want %q", got, want)
	}
	if got := formatCounts(nil); got != "delivered=0 relayed=0" {
		t.Errorf("empty: %q", got)
	}
}
