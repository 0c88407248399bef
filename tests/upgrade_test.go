package tests

import (
	"context"
	"crypto/md5"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"tcpha/internal/bench"
	cluster "tcpha/internal/nscluster"
)

// wrkDuring runs wrk with one request per connection while during runs,
// and fails the test on any non-2xx answer or socket error.
func wrkDuring(t *testing.T, c *cluster.Cluster, during func()) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	wrk := c.Exec(ctx, "client", "wrk", "-t2", "-c20", "-d8s", "-H", "Connection: close", url+"/index.html")
	done := make(chan []byte, 1)
	go func() { out, _ := wrk.CombinedOutput(); done <- out }()
	time.Sleep(2 * time.Second)
	during()
	out := <-done
	w, err := bench.ParseWrk(string(out))
	if err != nil {
		t.Fatalf("wrk: %v\n%s", err, out)
	}
	t.Logf("%d requests, %.0f/s, %d non-2xx, %d socket errors", w.Requests, w.RPS, w.Non2xx, w.SocketErrors)
	if w.Requests == 0 || w.Non2xx != 0 || w.SocketErrors != 0 {
		t.Errorf("requests failed across the upgrade:\n%s", out)
		for _, h := range []string{"fe", "be1", "be2"} {
			b, _ := os.ReadFile(c.AgentLog(h))
			for _, l := range strings.Split(string(b), "\n") {
				if strings.Contains(l, "level=WARN") || strings.Contains(l, "level=ERROR") || strings.Contains(l, "failed") ||
					strings.Contains(l, "op=upgrade") || strings.Contains(l, "refused") || strings.Contains(l, "not taken") {
					t.Logf("%s: %s", h, l)
				}
			}
		}
	}
}

// download starts a rate-limited download of path and returns a function
// that waits for it and checks it against want.
func download(t *testing.T, c *cluster.Cluster, path string, want []byte) func() {
	t.Helper()
	dst := filepath.Join(c.Dir, strings.ReplaceAll(t.Name(), "/", "_")+".download")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	// 5 MB/s: 20 MB last about four seconds.
	dl := c.Exec(ctx, "client", "curl", "-sS", "--limit-rate", "5M", "-o", dst, url+path)
	var stderr strings.Builder
	dl.Stderr = &stderr
	if err := dl.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	return func() {
		t.Helper()
		defer cancel()
		if err := dl.Wait(); err != nil {
			t.Fatalf("download: %v: %s", err, stderr.String())
		}
		got, _ := os.ReadFile(dst)
		if md5.Sum(got) != md5.Sum(want) {
			t.Fatalf("the download differs: %d bytes, want %d", len(got), len(want))
		}
	}
}

// lastLog returns the value of key in the last line of host's agent log
// whose message is msg, and the line.
func lastLog(t *testing.T, c *cluster.Cluster, host, msg, key string) (string, string) {
	t.Helper()
	b, _ := os.ReadFile(c.AgentLog(host))
	lines := strings.Split(string(b), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if !strings.Contains(lines[i], `msg="`+msg+`"`) {
			continue
		}
		for _, f := range strings.Fields(lines[i]) {
			if v, ok := strings.CutPrefix(f, key+"="); ok {
				return v, lines[i]
			}
		}
		return "", lines[i]
	}
	t.Fatalf("%s's log has no %q", host, msg)
	return "", ""
}

// Issue 8's upgrades: a new agent takes over from the running one, on the
// FE and on a BE, under load, and nobody notices.
func TestUpgrade(t *testing.T) {
	c := newCluster(t, cluster.Options{
		BEs: 2, Secret: "test-cluster-secret", Metrics: true, Notify: true,
		Rules:       []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		GlobalExtra: "handoverwait = 3s\n",
	})
	data := make([]byte, 20<<20)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(c.WWW("be1"), "big.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	pidChanged := func(host string, before int) {
		t.Helper()
		if after := c.AgentPID(host); after == before || after == 0 {
			t.Errorf("%s: agent pid %d after the upgrade, was %d", host, after, before)
		}
		// The successor owns the admin socket and the metrics port.
		if st, err := c.Admin(host, "status"); err != nil || !strings.Contains(st, fmt.Sprintf("pid=%d", c.AgentPID(host))) {
			t.Errorf("%s: status after the upgrade: %q %v", host, st, err)
		}
		if out, err := c.Output(context.Background(), host, "curl", "-sS", "http://"+cluster.MetricsAddr+"/metrics"); err != nil ||
			!strings.Contains(out, "tcpha_") {
			t.Errorf("%s: metrics after the upgrade: %v", host, err)
		}
	}

	t.Run("FE: tcpha-agent -upgrade under wrk -c20 Connection: close", func(t *testing.T) {
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		if _, err := k.get("/index.html"); err != nil {
			t.Fatal(err)
		}
		before := c.AgentPID("fe")
		wrkDuring(t, c, func() {
			if err := c.UpgradeAgent("fe", true); err != nil {
				t.Fatal(err)
			}
		})
		_, line := lastLog(t, c, "fe", "handed over", "took")
		t.Log(line)
		pidChanged("fe", before)
		// A connection handed off before the upgrade goes on: the new
		// agent moves it to be2's content.
		if got, err := k.get("/img/a.jpg"); err != nil || got != "200 be2" {
			t.Errorf("a handed-off connection after the upgrade: %q %v", got, err)
		}
	})

	t.Run("FE: SIGQUIT, then a plain start under wrk", func(t *testing.T) {
		before := c.AgentPID("fe")
		wrkDuring(t, c, func() {
			if err := c.StopAgentAsync("fe", syscall.SIGQUIT); err != nil {
				t.Fatal(err)
			}
			time.Sleep(500 * time.Millisecond) // it goes on serving meanwhile
			if err := c.UpgradeAgent("fe", false); err != nil {
				t.Fatal(err)
			}
		})
		pidChanged("fe", before)
	})

	t.Run("a plain start does not take over from an agent not asked to quit", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, err := c.Exec(ctx, "fe", agentBin, "-c", filepath.Join(c.Dir, "fe.conf")).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "another agent is running there") ||
			!strings.Contains(string(out), "-upgrade") {
			t.Errorf("a second plain start: %v\n%s", err, out)
		}
		if got := servedBy(t, c, "/index.html"); got != "200 be1" {
			t.Errorf("after the refused start: %q", got)
		}
	})

	t.Run("BE: -upgrade during a rate-limited 20 MB download and under wrk", func(t *testing.T) {
		// An idle keep-alive connection, a download in mid-body, and new
		// connections all through.
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		if _, err := k.get("/index.html"); err != nil {
			t.Fatal(err)
		}
		wait := download(t, c, "/big.bin", data)
		before := c.AgentPID("be1")
		wrkDuring(t, c, func() {
			if err := c.UpgradeAgent("be1", true); err != nil {
				t.Fatal(err)
			}
		})
		// The download and the idle connection moved to the new agent:
		// the old one did not finish them itself.
		if n, line := lastLog(t, c, "be1", "relayed connections handed over", "sessions"); n == "" || n == "0" || n == "1" {
			t.Errorf("the old BE handed over %q sessions, want the download and the idle connection at least: %s", n, line)
		}
		_, line := lastLog(t, c, "be1", "handed over", "took")
		t.Log(line)
		wait()
		pidChanged("be1", before)
		if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
			t.Errorf("an idle keep-alive connection after the BE's upgrade: %q %v", got, err)
		}
		if st, _ := c.Admin("fe", "status"); !strings.Contains(st, "up, control sessions") {
			t.Errorf("the FE's view of the BEs:\n%s", st)
		}
	})

	t.Run("BE: SIGQUIT, then a plain start, during a download", func(t *testing.T) {
		wait := download(t, c, "/big.bin", data)
		time.Sleep(time.Second)
		if err := c.StopAgentAsync("be1", syscall.SIGQUIT); err != nil {
			t.Fatal(err)
		}
		if err := c.UpgradeAgent("be1", false); err != nil {
			t.Fatal(err)
		}
		if n, line := lastLog(t, c, "be1", "relayed connections handed over", "sessions"); n != "1" {
			t.Errorf("the old BE handed over %q sessions, want the download's: %s", n, line)
		}
		wait()
	})

	t.Run("SIGUSR2 upgrades in place, and tells systemd the new main pid", func(t *testing.T) {
		if notes := c.Notifications("fe"); len(notes) == 0 || !strings.HasPrefix(notes[0], "READY=1\n") {
			t.Errorf("notifications at the first start: %q", notes)
		}
		before := c.AgentPID("fe")
		wrkDuring(t, c, func() {
			if err := c.UpgradeAgentBySignal("fe"); err != nil {
				t.Fatal(err)
			}
		})
		pidChanged("fe", before)
		notes := c.Notifications("fe")
		want := fmt.Sprintf("MAINPID=%d\nREADY=1", c.AgentPID("fe"))
		if len(notes) == 0 || !strings.HasPrefix(notes[len(notes)-1], want+"\n") {
			t.Errorf("notifications: %q, want the last to be %q", notes, want)
		}
	})

	t.Run("SIGQUIT with no new agent: it leaves the forwarding to the next", func(t *testing.T) {
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		if _, err := k.get("/index.html"); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := c.StopAgent("fe", syscall.SIGQUIT); err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took < 3*time.Second {
			t.Errorf("exited %v after SIGQUIT, before handoverwait (3 s)", took)
		}
		// No agent: the kernel still forwards the open connection.
		if got, err := k.get("/img/a.jpg"); err != nil || got != "200 be1" {
			t.Errorf("with no agent running: %q %v", got, err)
		}
		if err := c.StartAgent("fe"); err != nil {
			t.Fatal(err)
		}
		if table, _ := flowsOf(t, c); table[k.local()] != "HANDOFFED" {
			t.Errorf("the open connection was not adopted: %v", table)
		}
	})
}
