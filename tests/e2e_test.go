// Package tests holds tcpha's integration tests: real agents, nginx, curl
// and nft in network namespaces built by internal/nscluster. They need root; in
// CI they always run (see internal/privtest).
package tests

import (
	"bufio"
	"context"
	"crypto/md5"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
	"tcpha/internal/privtest"
)

var agentBin, ctlBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "tcpha-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	agentBin = filepath.Join(dir, "tcpha-agent")
	ctlBin = filepath.Join(dir, "tcphactl")
	if out, err := exec.Command("go", "build", "-o", dir+"/", "tcpha/cmd/tcpha-agent", "tcpha/cmd/tcphactl").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build tcpha-agent, tcphactl: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const url = "http://" + cluster.VIP

// curl runs curl in the client namespace and returns its stdout.
func curl(t *testing.T, c *cluster.Cluster, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := c.Output(ctx, "client", append([]string{"curl", "-sS", "-m", "30"}, args...)...)
	if err != nil {
		t.Fatalf("curl %v: %v", args, err)
	}
	return out
}

// servedBy fetches path and returns the X-Served-By header and the status.
func servedBy(t *testing.T, c *cluster.Cluster, path string) string {
	t.Helper()
	return strings.TrimSpace(curl(t, c, "-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}", url+path))
}

func newCluster(t *testing.T, opts cluster.Options) *cluster.Cluster {
	t.Helper()
	return newClusterWithout(t, opts)
}

// newClusterWithout is newCluster with the agents of the hosts in later
// ("fe" too) left for the test to start.
func newClusterWithout(t *testing.T, opts cluster.Options, later ...string) *cluster.Cluster {
	t.Helper()
	privtest.Require(t)
	opts.Agent = agentBin
	c, err := cluster.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			hosts := []string{"fe"}
			if opts.FE2 {
				hosts = append(hosts, "fe2")
			}
			for _, b := range c.BEs {
				hosts = append(hosts, b.Name)
			}
			for _, h := range hosts {
				if b, err := os.ReadFile(c.AgentLog(h)); err == nil {
					t.Logf("--- %s agent log (last 3000 bytes):\n%s", h, tailString(string(b), 3000))
				}
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("cluster cleanup: %v", err)
		}
	})
	for _, be := range c.BEs {
		if slices.Contains(later, be.Name) {
			continue
		}
		if err := c.StartAgent(be.Name); err != nil {
			t.Fatal(err)
		}
	}
	if slices.Contains(later, "fe") {
		return c
	}
	if err := c.StartAgent("fe"); err != nil {
		t.Fatal(err)
	}
	return c
}

// reusePort is getFrom for a fixed client port: each request closes
// server-first (Connection: close, read to EOF), so the port is free at once
// while the FE may still forward the old flow. A port briefly in LAST_ACK
// is retried.
func reusePort(t *testing.T, c *cluster.Cluster, port int, path string) string {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		got, err := getFrom(c, port, path)
		if err == nil {
			return got
		}
		if !errors.Is(err, syscall.EADDRINUSE) && !errors.Is(err, syscall.EADDRNOTAVAIL) || time.Now().After(deadline) {
			t.Fatalf("GET %s from port %d: %v", path, port, err)
		}
	}
}

// getFrom sends one `Connection: close` request from the client's port and
// reads the answer to EOF; it returns "STATUS SERVED-BY".
func getFrom(c *cluster.Cluster, port int, path string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := c.Dial(ctx, "client", port, fmt.Sprintf("%s:%d", cluster.VIP, cluster.Port))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: tcpha\r\nConnection: close\r\n\r\n", path)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return "", fmt.Errorf("read response: %w", err)
	}
	io.Copy(io.Discard, resp.Body)
	// Read the connection itself to EOF: the server closes first, so the
	// client's port does not go into TIME_WAIT.
	if _, err := io.Copy(io.Discard, br); err != nil {
		return "", fmt.Errorf("wait for the server's close: %w", err)
	}
	return fmt.Sprintf("%d %s", resp.StatusCode, resp.Header.Get("X-Served-By")), nil
}

func tailString(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// TestCluster is the acceptance list of the single-handoff core, on one
// cluster per accept mode (issue 14: the cluster tests run in both): rules
// `\.jpg$ -> be2`, `.* -> be1`, and with accept = fe `^/local/` served by
// the FE's local node. Subtests run in order; the ones that stop agents are
// last.
//
// FE-mode only, because accept = be has no such thing: the local node
// (accept = be refuses `local` rules: the FE reads no request) and so the
// reused port a local request takes over. Everything else, routing,
// serving, keep-alive moves, bad clients, forwarding's end, reused ports,
// BEs stopping and the clean stop, runs in both; with accept = be the BEs
// read the first requests and answer bad clients with their own [be]
// requesttimeout and maxheader.
func TestCluster(t *testing.T) {
	for _, accept := range []string{"fe", "be"} {
		t.Run("accept = "+accept, func(t *testing.T) { testCluster(t, accept == "be") })
	}
}

func testCluster(t *testing.T, acceptBE bool) {
	rules := []string{`rule = local ^/local/`, `rule = be2 \.jpg$`, `rule = be1 .*`}
	feExtra := "requesttimeout = 2\nhandofftimeout = 1\ndtcinterval = 1\nredirectport = 8080\ntimewait = 1\n"
	beExtra := ""
	if acceptBE {
		rules = rules[1:]
		feExtra += "accept = be\n"
		beExtra = "requesttimeout = 2\n"
	}
	c := newCluster(t, cluster.Options{
		BEs:      2,
		LocalWWW: !acceptBE,
		Secret:   "integration-secret",
		Rules:    rules,
		FEExtra:  feExtra,
		BEExtra:  beExtra,
	})
	if acceptBE {
		waitPlaced(t, c)
	}

	t.Run("rules pick the BE", func(t *testing.T) {
		want := map[string]string{
			"/index.html":       "200 be1",
			"/img/a.jpg":        "200 be2",
			"/local/index.html": "200 fe",
		}
		if acceptBE {
			delete(want, "/local/index.html")
		}
		for path, want := range want {
			if got := servedBy(t, c, path); got != want {
				t.Errorf("%s: got %q, want %q", path, got, want)
			}
		}
		if got := curl(t, c, url+"/index.html"); got != "index from be1\n" {
			t.Errorf("body %q", got)
		}
	})

	// Issue 19: the rules see the path nginx serves, with no fragment and
	// no dot segments, so a request cannot take a path to another rule's
	// BE. getFrom sends the target as it is (curl drops a fragment).
	t.Run("rules see the path nginx serves", func(t *testing.T) {
		for path, want := range map[string]string{
			"/index.html#.jpg":         "200 be1", // was be2, serving its own index
			"/local/../index.html":     "200 be1", // was the FE's local node
			"/local/%2e%2e/index.html": "200 be1",
			"/x/../img/a.jpg":          "200 be2",
			"//img//a.jpg?v=1":         "200 be2",
			"/../index.html":           "400 ", // above the root: the FE answers as nginx would
		} {
			if got, err := getFrom(c, 0, path); err != nil || got != want {
				t.Errorf("%s: got %q %v, want %q", path, got, err, want)
			}
		}
	})

	t.Run("20 MB response bypasses the FE", func(t *testing.T) {
		bigBypassesFE(t, c, "be1", "20 MB response", url+"/big.bin")
	})

	t.Run("keep-alive follows the rules (phttp = multi, the default)", func(t *testing.T) {
		out := curl(t, c, "-o", "/dev/null", "-w", "%{num_connects} %header{x-served-by}\n", url+"/index.html",
			"-o", "/dev/null", url+"/img/a.jpg")
		// One connection (the second transfer made none), moved from be1
		// to be2 for /img/a.jpg.
		if out != "1 be1\n0 be2\n" {
			t.Errorf("got %q, want one connection served by be1, then be2", out)
		}
	})

	// Issue 19: later requests are routed on the path nginx serves too,
	// and may follow an empty line (RFC 9112 section 2.2), also when their
	// connection moves to another BE with the empty line in its queue.
	t.Run("keep-alive: empty lines and the served path", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := c.Dial(ctx, "client", 0, fmt.Sprintf("%s:%d", cluster.VIP, cluster.Port))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(conn)
		for _, tc := range []struct{ req, want string }{
			{"GET /index.html HTTP/1.1\r\nHost: tcpha\r\n\r\n", "be1"},
			{"\r\nGET /index.html#.jpg HTTP/1.1\r\nHost: tcpha\r\n\r\n", "be1"},    // stays
			{"\r\n\r\nGET /x/../img/a.jpg HTTP/1.1\r\nHost: tcpha\r\n\r\n", "be2"}, // moves
		} {
			io.WriteString(conn, tc.req)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("%q: %v", tc.req, err)
			}
			io.Copy(io.Discard, resp.Body)
			if got := fmt.Sprintf("%d %s", resp.StatusCode, resp.Header.Get("X-Served-By")); got != "200 "+tc.want {
				t.Errorf("%q: got %q, want 200 from %s", tc.req, got, tc.want)
			}
		}
	})

	t.Run("ARP: the VIP stays on the FE", func(t *testing.T) {
		servedBy(t, c, "/index.html")
		feMAC, _ := c.MAC("fe")
		neigh, err := c.Output(context.Background(), "client", "ip", "neigh", "show", cluster.VIP)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(neigh, "lladdr "+feMAC) {
			t.Errorf("client's neighbour entry for the VIP is %q, want the FE's MAC %s", strings.TrimSpace(neigh), feMAC)
		}
		for _, be := range c.BEs {
			rs, _ := c.Output(context.Background(), be.Name, "nft", "list", "ruleset")
			if !strings.Contains(rs, "table arp tcpha") || !strings.Contains(rs, "arp saddr ip set "+be.UAddr) {
				t.Errorf("%s: arp table missing from nft list ruleset:\n%s", be.Name, rs)
			}
		}
		// The BE learnt the client's MAC although it never announced the VIP.
		if n, _ := c.Output(context.Background(), "be1", "ip", "neigh", "show", cluster.ClientIP); !strings.Contains(n, "lladdr") {
			t.Errorf("be1 cannot reach the client: %q", n)
		}
	})

	t.Run("500 one-request connections at concurrency 20", func(t *testing.T) {
		var cfg strings.Builder
		for i := range 500 {
			fmt.Fprintf(&cfg, "url = \"%s/index.html?n=%d\"\noutput = \"/dev/null\"\n", url, i)
		}
		f := filepath.Join(c.Dir, "urls.cfg")
		os.WriteFile(f, []byte(cfg.String()), 0o644)
		start := time.Now()
		out := curl(t, c, "-Z", "--parallel-max", "20", "-H", "Connection: close", "-w", "%{http_code}\n", "-K", f)
		codes := strings.Fields(out)
		ok := 0
		for _, code := range codes {
			if code == "200" {
				ok++
			}
		}
		t.Logf("500 connections in %v", time.Since(start))
		if ok != 500 {
			t.Errorf("%d of 500 answered 200 (%d answers)", ok, len(codes))
		}
	})

	t.Run("bad clients get an answer or a close in time", func(t *testing.T) {
		raw := func(send string) (string, time.Duration) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			script := fmt.Sprintf(`exec 3<>/dev/tcp/%s/%d; printf '%s' >&3; cat <&3`, cluster.VIP, cluster.Port, send)
			start := time.Now()
			out, _ := c.Exec(ctx, "client", "bash", "-c", script).Output()
			return string(out), time.Since(start)
		}
		var wg sync.WaitGroup
		wg.Go(func() {
			out, took := raw(`\x16\x03\x01\x00garbage\r\n\r\n`)
			if !strings.HasPrefix(out, "HTTP/1.1 400 ") || took > 3*time.Second {
				t.Errorf("garbage: %q after %v, want a 400", tailString(out, 80), took)
			}
		})
		wg.Go(func() {
			// requesttimeout = 2 s: a silent client gets a 408 and a close.
			out, took := raw(``)
			if !strings.HasPrefix(out, "HTTP/1.1 408 ") || took > 4*time.Second || took < 1500*time.Millisecond {
				t.Errorf("silent client: %q after %v, want a 408 after about 2 s", tailString(out, 80), took)
			}
		})
		wg.Go(func() {
			big := strings.Repeat("a", 9000)
			code := strings.TrimSpace(curl(t, c, "-o", "/dev/null", "-w", "%{http_code}", "-H", "X-Big: "+big, url+"/"))
			if code != "431" {
				t.Errorf("oversized header: status %s, want 431", code)
			}
		})
		// Others are served meanwhile.
		time.Sleep(200 * time.Millisecond)
		if got := servedBy(t, c, "/index.html"); got != "200 be1" {
			t.Errorf("while bad clients wait: %q", got)
		}
		wg.Wait()
	})

	// Fixed client ports below are under the ephemeral range (32768+), so
	// no connection of an earlier subtest can hold them.
	t.Run("forwarding ends after the connection", func(t *testing.T) {
		out := curl(t, c, "--local-port", "21002", "-o", "/dev/null", "-w", "%{http_code}", url+"/index.html")
		if out != "200" {
			t.Fatalf("request: %q", out)
		}
		closed := time.Now()
		// FIN seen -> TIME_WAIT for timewait (1 s) -> removed at the next
		// tick. Forwarding is kept until then: the close completes at the BE.
		flow := cluster.ClientIP + ":21002"
		if table, kernel := flowsOf(t, c); table[flow] != "TIME_WAIT" || !kernel[flow] {
			t.Errorf("right after the close: table %q, forwarded %v; want TIME_WAIT, forwarded", table[flow], kernel[flow])
		}
		waitGone(t, c, flow, 3*time.Second)
		if took := time.Since(closed); took < 900*time.Millisecond {
			t.Errorf("forwarding ended %v after the close, before timewait (1 s)", took)
		}
	})

	// A SYN from a client port whose previous connection is still
	// forwarded must reach the FE, never the old BE.
	t.Run("a reused client port is scheduled afresh", func(t *testing.T) {
		reuse := func(port int, path string) string { return reusePort(t, c, port, path) }
		if got := reuse(21000, "/img/a.jpg"); got != "200 be2" {
			t.Fatalf("first connection: %q", got)
		}
		if got := reuse(21000, "/index.html"); got != "200 be1" {
			t.Errorf("same port, other rule: %q, want be1 (the SYN went to the old BE?)", got)
		}
		// Same BE again while be1 holds the 4-tuple in TIME_WAIT. With TCP
		// timestamps the kernel lets a bound connect reuse it
		// (tcp_twsk_unique); without them the rebuild fails with
		// EADDRNOTAVAIL unless the BE clears the TIME_WAIT.
		c.Output(context.Background(), "client", "sysctl", "-qw", "net.ipv4.tcp_timestamps=0")
		defer c.Output(context.Background(), "client", "sysctl", "-qw", "net.ipv4.tcp_timestamps=1")
		for i := range 2 {
			if got := reuse(21001, "/index.html"); got != "200 be1" {
				t.Errorf("same port, same BE, no timestamps, request %d: %q, want be1", i+1, got)
			}
		}
		conns, _ := c.Admin("fe", "conns")
		// And once TIME_WAIT is over and the flow is gone, the port is a
		// new client like any other.
		waitGone(t, c, cluster.ClientIP+":21000", 3*time.Second)
		if got := reuse(21000, "/img/a.jpg"); got != "200 be2" {
			t.Errorf("same port after TIME_WAIT: %q, want be2", got)
		}
		// One entry per flow, however often the port was reused (it may
		// already have expired: timewait is 1 s here).
		if n := strings.Count(conns, "10.77.0.10:21000 "); n > 1 {
			t.Errorf("connection table has %d entries for the reused port:\n%s", n, conns)
		}
	})

	// The same for a request the local node serves: the old flow's
	// forwarding must go at once, not when its TIME_WAIT ends, or the new
	// connection would follow it to the old BE once it is no longer fresh.
	t.Run("a reused port served locally drops the old forwarding", func(t *testing.T) {
		if acceptBE {
			return // no local node
		}
		flow := cluster.ClientIP + ":21003"
		if got := reusePort(t, c, 21003, "/index.html"); got != "200 be1" {
			t.Fatalf("first connection: %q", got)
		}
		if got := reusePort(t, c, 21003, "/local/index.html"); got != "200 fe" {
			t.Fatalf("local request from the same port: %q", got)
		}
		if _, kernel := flowsOf(t, c); kernel[flow] {
			t.Error("the old connection's forwarding outlived a local connection on its port")
		}
	})

	t.Run("a BE whose agent stops: the FE answers within 5 s", func(t *testing.T) {
		if err := c.StopAgent("be2", syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct{ path, want string }{
			{"/img/a.jpg", "200 be1"}, // next matching rule's BE
			{"/index.html", "200 be1"},
		} {
			start := time.Now()
			if got := servedBy(t, c, tc.path); got != tc.want || time.Since(start) > 5*time.Second {
				t.Errorf("%s with be2 stopped: %q after %v, want %q", tc.path, got, time.Since(start), tc.want)
			}
		}
		if err := c.StopAgent("be1", syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if got := servedBy(t, c, "/index.html"); got != "503" || time.Since(start) > 5*time.Second {
			t.Errorf("no BE left: %q after %v, want a 503 from the FE", got, time.Since(start))
		}
		if got := servedBy(t, c, "/local/index.html"); !acceptBE && got != "200 fe" {
			t.Errorf("local node with no BE: %q", got)
		}
		// Detection brings the BEs back.
		for _, h := range []string{"be1", "be2"} {
			if err := c.StartAgent(h); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.Now().Add(10 * time.Second)
		for servedBy(t, c, "/img/a.jpg") != "200 be2" {
			if time.Now().After(deadline) {
				t.Fatal("be2 not scheduled again 10 s after its agent restarted")
			}
			time.Sleep(200 * time.Millisecond)
		}
	})

	t.Run("SIGTERM leaves nothing behind", func(t *testing.T) {
		for _, h := range []string{"fe", "be1", "be2"} {
			if err := c.StopAgent(h, syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			if rs, _ := c.Output(context.Background(), h, "nft", "list", "ruleset"); strings.TrimSpace(rs) != "" {
				t.Errorf("%s: ruleset after SIGTERM:\n%s", h, rs)
			}
			if a, _ := c.Output(context.Background(), h, "ip", "-4", "addr"); strings.Contains(a, cluster.VIP) {
				t.Errorf("%s: VIP still configured:\n%s", h, a)
			}
		}
	})
}

// bigBypassesFE puts 20 random MB as big.bin on be's web server, downloads
// it with curl (args end with the URL), and checks the bytes and that the
// FE's eth0 sent under 2 MB meanwhile: the response went from the BE
// straight to the client.
func bigBypassesFE(t *testing.T, c *cluster.Cluster, be, what string, args ...string) {
	t.Helper()
	data := make([]byte, 20<<20)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(c.WWW(be), "big.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	before, err := c.Counter("fe", "tx_bytes")
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(c.Dir, "big-"+be+".download")
	curl(t, c, append([]string{"-o", dst}, args...)...)
	after, _ := c.Counter("fe", "tx_bytes")
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if md5.Sum(got) != md5.Sum(data) {
		t.Fatalf("download differs: %d bytes, md5 %x want %x", len(got), md5.Sum(got), md5.Sum(data))
	}
	sent := after - before
	t.Logf("%s; FE eth0 transmitted %d bytes", what, sent)
	if sent >= 2<<20 {
		t.Errorf("FE transmitted %d bytes for a 20 MB response, want under 2 MB", sent)
	}
}
