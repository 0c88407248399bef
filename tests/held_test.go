package tests

import (
	"strings"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// Issue 19: a BE whose agent dies resets its keep-alive clients from its
// kernel, straight to them: the FE never sees those connections end, and
// their rows stayed HANDOFFED (and counted for wlc) until idletimeout.
// When the BE's agent is back, the FE asks it which connections it holds
// and ends the forwarding of the others within seconds; the other BE's
// connections go on.
func TestHeldAfterBECrash(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret",
		Rules:   []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "phttp = single\ntimewait = 2\n"})
	const n = 5
	var lost []*keepAlive
	for range n {
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		if got, err := k.get("/img/a.jpg"); err != nil || got != "200 be2" {
			t.Fatalf("a keep-alive connection to be2: %q %v", got, err)
		}
		lost = append(lost, k)
	}
	kept := dialKeepAlive(t, c)
	defer kept.conn.Close()
	if got, err := kept.get("/index.html"); err != nil || got != "200 be1" {
		t.Fatalf("a keep-alive connection to be1: %q %v", got, err)
	}

	if err := c.StopAgent("be2", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Each client's next request meets be2's kernel, which closed the dead
	// agent's sockets: it answers with a RST that never crosses the FE.
	for _, k := range lost {
		if got, err := k.get("/img/a.jpg"); err == nil {
			t.Fatalf("%s: a request to a dead BE's connection answered %q", k.local(), got)
		}
	}
	time.Sleep(time.Second)
	table, _ := flowsOf(t, c)
	for _, k := range lost {
		if table[k.local()] != "HANDOFFED" {
			t.Fatalf("%s: %q before be2 is back; the FE saw its end after all, so this test shows nothing", k.local(), table[k.local()])
		}
	}

	if err := c.StartAgent("be2"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for _, k := range lost {
		waitGone(t, c, k.local(), 15*time.Second)
	}
	t.Logf("be2's %d lost connections gone %v after its agent restarted", n, time.Since(start).Round(100*time.Millisecond))
	if l := c.Grep("fe", `msg="connections their BE no longer holds: forwarding ends"`); !strings.Contains(l, "connections=5") {
		t.Errorf("FE log: %q", l)
	}
	table, _ = flowsOf(t, c)
	if table[kept.local()] != "HANDOFFED" {
		t.Errorf("be1's connection: %q, want HANDOFFED", table[kept.local()])
	}
	if got, err := kept.get("/index.html"); err != nil || got != "200 be1" {
		t.Errorf("be1's connection after be2's return: %q %v", got, err)
	}
}
