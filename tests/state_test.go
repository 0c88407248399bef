package tests

import (
	"bufio"
	"context"
	"crypto/md5"
	"crypto/rand"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

var (
	reCounter = regexp.MustCompile(`counter packets \d+ bytes \d+`)
	reHandle  = regexp.MustCompile(` # handle \d+`)
	reExpires = regexp.MustCompile(` expires [0-9hms.]+`)
	reElems   = regexp.MustCompile(`(?s)\n\s*elements = \{[^}]*\}`)
)

// ruleset returns host's `nft list ruleset` without counters, handles,
// expiry times and elements, for golden comparison.
func ruleset(t *testing.T, c *cluster.Cluster, host string) string {
	t.Helper()
	out, err := c.Output(context.Background(), host, "nft", "list", "ruleset")
	if err != nil {
		t.Fatal(err)
	}
	out = reCounter.ReplaceAllString(out, "counter")
	out = reHandle.ReplaceAllString(out, "")
	out = reExpires.ReplaceAllString(out, "")
	return reElems.ReplaceAllString(out, "")
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if os.Getenv("UPDATE_GOLDEN") != "" {
		os.MkdirAll("testdata", 0o755)
		os.WriteFile(path, []byte(got), 0o644)
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (UPDATE_GOLDEN=1 creates it)", err)
	}
	if got != string(want) {
		t.Errorf("%s differs:\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

// statusInt reads `name=N` from the FE's `tcphactl status`.
func statusInt(t *testing.T, c *cluster.Cluster, name string) int {
	t.Helper()
	st, err := c.Admin("fe", "status")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`\b` + regexp.QuoteMeta(name) + `=(\d+)`).FindStringSubmatch(st)
	if m == nil {
		t.Fatalf("no %s in status:\n%s", name, st)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// queueCount reads a queue counter such as "event=rst" from the FE's
// status; a counter that never counted is absent there, and 0.
func queueCount(t *testing.T, c *cluster.Cluster, label string) int {
	t.Helper()
	st, err := c.Admin("fe", "status")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`\b` + regexp.QuoteMeta(label) + `:(\d+)`).FindStringSubmatch(st)
	if m == nil {
		return 0
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// queuedBy runs fn and returns how many packets it queued to the FE agent,
// once the connection's FIN has arrived.
func queuedBy(t *testing.T, c *cluster.Cluster, fn func()) int {
	t.Helper()
	before := statusInt(t, c, "queued")
	fn()
	deadline := time.Now().Add(5 * time.Second)
	for statusInt(t, c, "queued") == before {
		if time.Now().After(deadline) {
			t.Fatal("the connection's FIN never reached the agent")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // retransmissions, a late RST
	return statusInt(t, c, "queued") - before
}

// flowsOf returns the client flows in the FE's connection table (by state)
// and in its forward map.
func flowsOf(t *testing.T, c *cluster.Cluster) (table map[string]string, kernel map[string]bool) {
	t.Helper()
	// Through the operator's tool, as the issue asks.
	out, err := exec.Command(ctlBin, "-s", c.AdminSocket("fe"), "conns").CombinedOutput()
	if err != nil {
		t.Fatalf("tcphactl conns: %v: %s", err, out)
	}
	conns := string(out)
	table = map[string]string{}
	for _, l := range strings.Split(conns, "\n")[1:] {
		if f := strings.Fields(l); len(f) >= 3 {
			table[f[0]] = f[2]
		}
	}
	m, err := c.Output(context.Background(), "fe", "nft", "-j", "list", "map", "ip", "tcpha", "forward")
	if err != nil {
		t.Fatal(err)
	}
	kernel = map[string]bool{}
	for _, e := range regexp.MustCompile(`"concat": \["([0-9.]+)", (\d+)\]`).FindAllStringSubmatch(m, -1) {
		kernel[e[1]+":"+e[2]] = true
	}
	return table, kernel
}

func lastLine(s string) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return l[len(l)-1]
}

// keepAlive is a client connection that sends requests one at a time.
type keepAlive struct {
	conn net.Conn
	br   *bufio.Reader
}

func dialKeepAlive(t *testing.T, c *cluster.Cluster) *keepAlive {
	t.Helper()
	conn, err := c.Dial(context.Background(), "client", 0, fmt.Sprintf("%s:%d", cluster.VIP, cluster.Port))
	if err != nil {
		t.Fatal(err)
	}
	return &keepAlive{conn: conn, br: bufio.NewReader(conn)}
}

func (k *keepAlive) get(path string) (string, error) {
	k.conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(k.conn, "GET %s HTTP/1.1\r\nHost: tcpha\r\n\r\n", path)
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	buf := new(strings.Builder)
	if _, err := bufio.NewReader(resp.Body).WriteTo(buf); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d %s", resp.StatusCode, resp.Header.Get("X-Served-By")), nil
}

func (k *keepAlive) local() string { return k.conn.LocalAddr().String() }

// waitGone waits until flow is neither in the FE's table nor in its map.
func waitGone(t *testing.T, c *cluster.Cluster, flow string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		table, kernel := flowsOf(t, c)
		if _, ok := table[flow]; !ok && !kernel[flow] {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still known %v after it closed: table %v kernel %v", flow, within, table[flow], kernel[flow])
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestStateMachine is issue 3's acceptance on one cluster: the control path
// through NFQUEUE, the fast path in nft, and an agent that survives its own
// restart. timewait is 1 s.
func TestStateMachine(t *testing.T) {
	c := newCluster(t, cluster.Options{
		BEs:     2,
		Rules:   []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "timewait = 1\ndrain = 8\n",
	})

	t.Run("golden rulesets", func(t *testing.T) {
		// The agent installs the native queue expression where the kernel
		// has nft_queue and the xtables target where not (this kernel):
		// the FIN/RST rule must queue the way its status says, and the
		// rest of the table is the same either way. nft 1.0.6 prints the
		// target as "queue num N" and the expression as "queue to N".
		fe := ruleset(t, c, "fe")
		st, err := c.Admin("fe", "status")
		if err != nil {
			t.Fatal(err)
		}
		compat, listed := "queue num 0", ""
		switch {
		case strings.Contains(st, "queue=0 via native nft queue"):
			listed = "queue to 0"
		case strings.Contains(st, "queue=0 via xtables NFQUEUE target"):
			listed = compat
		default:
			t.Fatalf("no queue mode in the status:\n%s", st)
		}
		if !strings.Contains(fe, listed) {
			t.Errorf("the FE's FIN/RST rule does not %s as its status says:\n%s", listed, fe)
		}
		golden(t, "cluster-fe.nft", strings.Replace(fe, listed, compat, 1))
		golden(t, "cluster-be1.nft", ruleset(t, c, "be1"))
	})

	data := make([]byte, 20<<20)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(c.WWW("be1"), "big.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}

	t.Run("a handful of packets per connection reach the agent", func(t *testing.T) {
		n := queuedBy(t, c, func() { curl(t, c, "-o", "/dev/null", url+"/big.bin") })
		t.Logf("20 MB download: %d packets queued to the FE agent", n)
		if n > 4 {
			t.Errorf("20 MB download queued %d packets, want at most 4", n)
		}
		var urls []string
		for i := range 20 {
			urls = append(urls, "-o", "/dev/null", fmt.Sprintf("%s/index.html?%d", url, i))
		}
		var conns string
		n = queuedBy(t, c, func() {
			conns = curl(t, c, append([]string{"-w", "%{num_connects}"}, urls...)...)
		})
		t.Logf("20 requests on one connection: %d packets queued", n)
		if conns != "1"+strings.Repeat("0", 19) {
			t.Errorf("curl opened connections %q, want one for all 20 requests", conns)
		}
		if n > 4 {
			t.Errorf("keep-alive connection queued %d packets, want at most 4", n)
		}
	})

	t.Run("the table and the kernel agree after a burst", func(t *testing.T) {
		var open []*keepAlive
		for range 20 {
			k := dialKeepAlive(t, c)
			if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
				t.Fatalf("request: %q %v", got, err)
			}
			open = append(open, k)
		}
		table, kernel := flowsOf(t, c)
		for _, k := range open {
			if table[k.local()] != "HANDOFFED" || !kernel[k.local()] {
				t.Errorf("%s: table %q, forward map %v", k.local(), table[k.local()], kernel[k.local()])
			}
		}
		for flow, state := range table {
			if (state == "HANDOFFED" || state == "TIME_WAIT") != kernel[flow] {
				t.Errorf("%s: table %s but forward map %v", flow, state, kernel[flow])
			}
		}
		for flow := range kernel {
			if _, ok := table[flow]; !ok {
				t.Errorf("%s forwarded but not in the table", flow)
			}
		}
		for _, k := range open {
			k.conn.Close()
		}
		for _, k := range open {
			waitGone(t, c, k.local(), 4*time.Second)
		}
	})

	t.Run("RST ends forwarding", func(t *testing.T) {
		k := dialKeepAlive(t, c)
		if _, err := k.get("/index.html"); err != nil {
			t.Fatal(err)
		}
		rsts := queueCount(t, c, "event=rst")
		k.conn.(*net.TCPConn).SetLinger(0) // close with RST
		k.conn.Close()
		waitGone(t, c, k.local(), 3*time.Second)
		if queueCount(t, c, "event=rst") != rsts+1 {
			t.Error("the RST was not seen by the agent")
		}
	})

	t.Run("SIGKILL and restart during a 20 MB download", func(t *testing.T) {
		dst := filepath.Join(c.Dir, "killed.download")
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		// 5 MB/s: the download lasts about four seconds.
		dl := c.Exec(ctx, "client", "curl", "-sS", "--limit-rate", "5M", "-o", dst, url+"/big.bin")
		var stderr strings.Builder
		dl.Stderr = &stderr
		if err := dl.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		if err := c.StopAgent("fe", syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(ruleset(t, c, "fe"), "table ip tcpha") {
			t.Fatal("the killed agent's table is gone")
		}
		if err := c.StartAgent("fe"); err != nil {
			t.Fatal(err)
		}
		table, kernel := flowsOf(t, c)
		adopted := 0
		for flow, state := range table {
			if state == "HANDOFFED" && kernel[flow] {
				adopted++
			}
		}
		if adopted != 1 {
			t.Errorf("the new agent adopted %d handed-off flows, want the download's 1: %v", adopted, table)
		}
		if err := dl.Wait(); err != nil {
			t.Fatalf("download: %v: %s", err, stderr.String())
		}
		got, _ := os.ReadFile(dst)
		if md5.Sum(got) != md5.Sum(data) {
			t.Fatalf("download after the restart differs: %d bytes", len(got))
		}
	})

	t.Run("a second agent cannot disturb the first", func(t *testing.T) {
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		if _, err := k.get("/index.html"); err != nil {
			t.Fatal(err)
		}
		conf := c.Config("fe")
		other := strings.Replace(conf, c.AdminSocket("fe"), c.AdminSocket("fe")+".2", 1)
		// Each must fail before it touches the kernel: on the admin socket,
		// or on the NFQUEUE bind.
		for name, tc := range map[string]struct{ text, reason string }{
			"same admin socket":  {conf, "another agent is running there"},
			"other admin socket": {other, "bind NFQUEUE 0"},
		} {
			text := tc.text
			path := filepath.Join(c.Dir, "second.conf")
			os.WriteFile(path, []byte(text), 0o644)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			out, err := c.Exec(ctx, "fe", agentBin, "-c", path).CombinedOutput()
			cancel()
			if err == nil {
				t.Errorf("%s: a second agent started:\n%s", name, out)
			}
			if !strings.Contains(string(out), tc.reason) {
				t.Errorf("%s: failed for another reason than %q:\n%s", name, tc.reason, lastLine(string(out)))
			}
			// The first agent still moves the connection to be2's content.
			if got, err := k.get("/img/a.jpg"); err != nil || got != "200 be2" {
				t.Fatalf("%s: the first agent's connection broke: %q %v", name, got, err)
			}
			if table, kernel := flowsOf(t, c); table[k.local()] != "HANDOFFED" || !kernel[k.local()] {
				t.Fatalf("%s: the first agent lost its flow: table %q kernel %v", name, table[k.local()], kernel[k.local()])
			}
		}
		if got := servedBy(t, c, "/index.html"); got != "200 be1" {
			t.Errorf("new clients after the attempts: %q", got)
		}
	})

	t.Run("SIGQUIT and a new agent hand over, SIGTERM still cleans up", func(t *testing.T) {
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		if _, err := k.get("/index.html"); err != nil {
			t.Fatal(err)
		}
		if err := c.StopAgentAsync("fe", syscall.SIGQUIT); err != nil {
			t.Fatal(err)
		}
		if err := c.UpgradeAgent("fe", false); err != nil {
			t.Fatal(err)
		}
		// The new agent adopted the connection: it moves it to be2.
		if got, err := k.get("/img/a.jpg"); err != nil || got != "200 be2" {
			t.Errorf("after the handover: %q %v, want the connection moved to be2", got, err)
		}
		if table, _ := flowsOf(t, c); table[k.local()] != "HANDOFFED" {
			t.Errorf("the open connection was not adopted: %v", table)
		}
	})

	t.Run("SIGTERM drains handed-off connections", func(t *testing.T) {
		k := dialKeepAlive(t, c)
		if _, err := k.get("/index.html"); err != nil {
			t.Fatal(err)
		}
		c.StopAgentAsync("fe", syscall.SIGTERM)
		time.Sleep(500 * time.Millisecond)
		// New clients are no longer taken...
		if _, err := getFrom(c, 0, "/index.html"); err == nil {
			t.Error("a new connection was accepted while draining")
		}
		// ...but the open one is still forwarded, and moved.
		if got, err := k.get("/img/a.jpg"); err != nil || got != "200 be2" {
			t.Errorf("during the drain: %q %v", got, err)
		}
		k.conn.Close()
		start := time.Now()
		if err := c.WaitAgent("fe", 8*time.Second); err != nil {
			t.Fatal(err)
		}
		t.Logf("agent exited %v after the last connection closed", time.Since(start).Round(10*time.Millisecond))
		if rs := strings.TrimSpace(ruleset(t, c, "fe")); rs != "" {
			t.Errorf("after the drain:\n%s", rs)
		}
		if a, _ := c.Output(context.Background(), "fe", "ip", "-4", "addr"); strings.Contains(a, cluster.VIP) {
			t.Errorf("VIP left behind by an agent that adopted it:\n%s", a)
		}
	})
}
