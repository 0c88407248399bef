package tests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// acceptBE is a two-BE cluster with [fe] accept = be: the FE's packet path
// places new flows, the BEs accept and route them.
func acceptBE(t *testing.T) *cluster.Cluster {
	t.Helper()
	// PublicWWW: a move that fails falls back to fetching from the other
	// BE's web server, at its own address.
	c := newCluster(t, cluster.Options{BEs: 2, PublicWWW: true, Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "accept = be\ntimewait = 2\npintimeout = 3\n"})
	waitPlaced(t, c)
	return c
}

// waitPlaced waits until the FE's slot map holds both BEs: it fills once
// the BEs took its accept = be cluster frame.
func waitPlaced(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(c.Grep("fe", "placement changed"), "10.77.0.12="); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the FE placed no flow on both BEs:\n%s", c.Grep("fe", "place"))
		}
	}
}

// Issue 14's acceptance: with accept = be, 2,000 one-request connections at
// concurrency 32, half for each BE, are each answered by the right BE; the
// FE's own stack sends no segment to a client; and once TIME_WAIT is over
// the FE's forward map holds nothing, nor its connection table.
func TestAcceptBE(t *testing.T) {
	c := acceptBE(t)
	if got := servedBy(t, c, "/index.html"); got != "200 be1" {
		t.Errorf("/index.html: %q, want 200 be1", got)
	}
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be2" {
		t.Errorf("/img/a.jpg: %q, want 200 be2", got)
	}
	// tcphactl conns on the FE lists a held connection from the kernel's
	// pins, with the BE that serves it.
	ka := dialKeepAlive(t, c)
	if got, err := ka.get("/img/a.jpg"); err != nil || got != "200 be2" {
		t.Fatalf("keep-alive: %q %v", got, err)
	}
	local := ka.conn.LocalAddr().String()
	conns, err := c.Admin("fe", "conns")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(regexp.QuoteMeta(local) + `\s+` + regexp.QuoteMeta(c.BEs[1].IP) + `\s+HANDOFFED`).MatchString(conns) {
		t.Errorf("tcphactl conns does not show %s on be2:\n%s", local, conns)
	}
	ka.conn.Close()
	// Every segment the FE's eth0 sends from the VIP came from its own
	// stack: the BEs answer clients from their own links.
	capt := startCapture(t, c, "fe", "tcp and src host "+cluster.VIP)
	var cfg strings.Builder
	const n = 2000
	for i := range n {
		path := "/index.html"
		if i%2 == 1 {
			path = "/img/a.jpg"
		}
		fmt.Fprintf(&cfg, "url = \"%s%s?%d\"\noutput = \"/dev/null\"\n", url, path, i)
	}
	urls := filepath.Join(c.Dir, "urls.txt")
	if err := os.WriteFile(urls, []byte(cfg.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	start := time.Now()
	out, err := c.Output(ctx, "client", "curl", "-sS", "--parallel", "--parallel-max", "32", "-m", "20",
		"-H", "Connection: close", "-w", "%{url} %{http_code} %header{x-served-by}\\n", "-K", urls)
	if err != nil {
		t.Fatalf("curl: %v\n%s", err, tailString(out, 2000))
	}
	took := time.Since(start)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	wrong := 0
	for _, l := range lines {
		f := strings.Fields(l)
		want := "be1"
		if strings.Contains(l, ".jpg") {
			want = "be2"
		}
		if len(f) != 3 || f[1] != "200" || f[2] != want {
			if wrong++; wrong <= 5 {
				t.Errorf("answer %q, want 200 from %s", l, want)
			}
		}
	}
	if len(lines) != n || wrong > 0 {
		t.Fatalf("%d answers, %d wrong, want %d right", len(lines), wrong, n)
	}
	if sent := capt.stop(t); sent != 0 {
		t.Errorf("the FE's stack sent %d TCP segments from the VIP; want none", sent)
	}
	t.Logf("%d one-request connections in %v", n, took.Round(time.Millisecond))
	// TIME_WAIT is 2 s from each flow's last client segment.
	deadline := time.Now().Add(10 * time.Second)
	for {
		fwd, alive := setElements(t, c, "map", "forward"), setElements(t, c, "set", "alive")
		conns, err := c.Admin("fe", "conns")
		if err != nil {
			t.Fatal(err)
		}
		rows := len(strings.Split(strings.TrimSpace(conns), "\n")) - 1 // less the heading
		if fwd == 0 && alive == 0 && rows <= 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after TIME_WAIT: forward %d, alive %d, connection table:\n%s", fwd, alive, conns)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// A SYN flood from spoofed addresses (hping3 on mallory, at most 10,000
// SYNs a second: more starves the two cores the whole cluster shares, and
// then the client's own curl, not the FE, is what waits) with accept = be:
// the FE's stack answers none of it, the pins of flows that never ask lapse
// after pintimeout, the forward map never passes its size, and a
// legitimate client is served all along, each request by its BE.
func TestAcceptBESYNFlood(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Mallory: true, Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "accept = be\ntimewait = 2\npintimeout = 2\n"})
	waitPlaced(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	flood := c.Exec(ctx, "mallory", "hping3", "-q", "-S", "-p", "80", "-i", "u100", "--rand-source", cluster.VIP)
	if err := flood.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { flood.Process.Kill(); flood.Wait() }()
	// Every segment the FE's eth0 sends from the VIP came from its own
	// stack.
	capt := startCapture(t, c, "fe", "tcp and src host "+cluster.VIP)
	time.Sleep(time.Second)
	var maxPins int
	start := time.Now()
	for i := range 10 {
		path, want := "/index.html", "200 be1"
		if i%2 == 1 {
			path, want = "/img/a.jpg", "200 be2"
		}
		out, err := c.Output(ctx, "client", "curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}", url+path)
		if err != nil || strings.TrimSpace(out) != want {
			t.Errorf("request %d during the flood: %q %v, want %s", i, out, err, want)
		}
		if i%3 == 0 {
			maxPins = max(maxPins, setElements(t, c, "map", "forward"))
		}
	}
	flood.Process.Kill()
	flood.Wait()
	t.Logf("up to %d flows pinned during the flood; 10 requests took %v", maxPins, time.Since(start).Round(time.Millisecond))
	if maxPins < 1000 {
		t.Errorf("only %d flows pinned: the flood did not reach the FE", maxPins)
	}
	if maxPins > 1<<18 {
		t.Errorf("%d flows pinned, beyond the map's size", maxPins)
	}
	if sent := capt.stop(t); sent != 0 {
		t.Errorf("the FE's stack sent %d TCP segments from the VIP during the flood", sent)
	}
	// The flood's pins never asked: they lapse after pintimeout.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		n := setElements(t, c, "map", "forward")
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d pins left 10 s after the flood", n)
		}
	}
}

// An FE upgrade, and a BE's, with accept = be lose nothing: the successor carries the
// pins and its predecessor's slot map, so that one-request connections
// under wrk all succeed across it (a SYN between the two agents is placed,
// not dropped), and a held connection is still served and still moves.
func TestAcceptBEUpgrade(t *testing.T) {
	c := acceptBE(t)
	k := dialKeepAlive(t, c)
	defer k.conn.Close()
	if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
		t.Fatalf("before: %q %v", got, err)
	}
	wrkDuring(t, c, func() {
		if err := c.UpgradeAgent("fe", true); err != nil {
			t.Fatal(err)
		}
	})
	// Every move in the handover's moment waited for the successor: none
	// fell back to fetching from the other BE's web server.
	for _, be := range []string{"be1", "be2"} {
		if n := statusOf(t, c, be, "not_moved"); n != 0 {
			t.Errorf("%s kept %d connections that belonged elsewhere:\n%s", be, n, c.Grep(be, "not moved"))
		}
	}
	if !strings.Contains(c.Grep("fe", "placing table installed"), "carried=") {
		t.Errorf("the successor installed no placing table:\n%s", c.Grep("fe", "place"))
	}
	for _, p := range [][2]string{{"/img/a.jpg", "200 be2"}, {"/index.html", "200 be1"}} {
		if got, err := k.get(p[0]); err != nil || got != p[1] {
			t.Errorf("the held connection after the upgrade, %s: %q %v", p[0], got, err)
		}
	}
	// A BE's upgrade hands its VIP:port listener to the successor: the
	// connections the FE places on it meanwhile wait in its backlog.
	wrkDuring(t, c, func() {
		if err := c.UpgradeAgent("be2", true); err != nil {
			t.Fatal(err)
		}
	})
	if !strings.Contains(c.Grep("be2", "inherited listener"), "vip=") {
		t.Errorf("be2's successor did not take the VIP listener:\n%s", c.Grep("be2", "accept"))
	}
}
