package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// Issue 9's acceptance: what an operator does with a running cluster.

// ctl runs tcphactl against host's agent and returns its stdout; a
// non-zero exit fails the test.
func ctl(t *testing.T, c *cluster.Cluster, host string, args ...string) string {
	t.Helper()
	out, err := ctlRun(c, host, args...)
	if err != nil {
		t.Fatalf("tcphactl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return out
}

func ctlRun(c *cluster.Cluster, host string, args ...string) (string, error) {
	cmd := exec.Command(ctlBin, append([]string{"-s", c.AdminSocket(host)}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out) + stderr.String(), err
	}
	return string(out), nil
}

// beStatus is one row of `tcphactl -o json backends`.
type beStatus struct {
	Addr       string `json:"addr"`
	Weight     int    `json:"weight"`
	Available  bool   `json:"available"`
	Draining   bool   `json:"draining"`
	Registered bool   `json:"registered"`
	Active     int    `json:"active"`
	Live       int    `json:"live"`
	Handoffs   int64  `json:"handoffs"`
	Failures   int64  `json:"failures"`
	LastError  string `json:"last_error"`
}

func backendsOf(t *testing.T, c *cluster.Cluster) map[string]beStatus {
	t.Helper()
	var rows []beStatus
	out := ctl(t, c, "fe", "-o", "json", "backends")
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("tcphactl -o json backends: %v: %s", err, out)
	}
	m := map[string]beStatus{}
	for _, r := range rows {
		m[r.Addr] = r
	}
	return m
}

// askWhile asks for path over and over from the client, a new connection
// each time, while during runs, and returns the answers ("200 be1"), or
// what went wrong and when for a request that failed or took over 3 s.
func askWhile(c *cluster.Cluster, path string, during func()) []string {
	stop := make(chan struct{})
	var answers []string
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			start := time.Now()
			out, err := c.Output(context.Background(), "client", "curl", "-sS", "-m", "5", "-o", "/dev/null",
				"-w", "%{http_code} %header{x-served-by}", url+path)
			if took := time.Since(start); err != nil || took > 3*time.Second {
				answers = append(answers, fmt.Sprintf("hung or failed after %v: %v %s", took, err, out))
				continue
			}
			answers = append(answers, strings.TrimSpace(out))
			time.Sleep(10 * time.Millisecond)
		}
	})
	func() {
		// A failing during (t.Fatal) still stops the asking.
		defer func() { close(stop); wg.Wait() }()
		during()
	}()
	return answers
}

// waitBackend polls `tcphactl backends` until ok holds for be's row (nil
// when the FE does not list it), and returns how long that took.
func waitBackend(t *testing.T, c *cluster.Cluster, be string, within time.Duration, what string, ok func(*beStatus) bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		rows := backendsOf(t, c)
		row, listed := rows[be]
		var p *beStatus
		if listed {
			p = &row
		}
		if ok(p) {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("%s: not %s within %v:\n%s", be, what, within, ctl(t, c, "fe", "backends"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Health detection: a BE whose web server stops is NOTAVAILABLE within
// dtcinterval × fall (+2 s), its requests fall through to the next rule and
// none hangs; restarted, it is AVAILABLE within dtcinterval × rise (+2 s).
func TestHealthDetection(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret",
		Rules:   []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "dtcinterval = 1\nfall = 2\nrise = 2\n"})
	be2 := c.BEs[1].IP
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be2" {
		t.Fatalf("before: %q", got)
	}
	waitBackend(t, c, be2, 5*time.Second, "AVAILABLE", func(b *beStatus) bool { return b != nil && b.Available })

	logBefore, _ := os.ReadFile(c.AgentLog("fe"))
	if err := c.StopWWW("be2"); err != nil {
		t.Fatal(err)
	}
	// Requests keep being answered while the FE finds out: by be2's agent
	// (502: its web server is gone) until then, by be1 afterwards.
	var took time.Duration
	answers := askWhile(c, "/img/a.jpg", func() {
		took = waitBackend(t, c, be2, 1*2*time.Second+2*time.Second, "NOTAVAILABLE", func(b *beStatus) bool { return b != nil && !b.Available })
		time.Sleep(500 * time.Millisecond)
	})
	t.Logf("be2 NOTAVAILABLE %v after its web server stopped; answers meanwhile: %v", took.Round(time.Millisecond), answers)
	for _, a := range answers {
		if a != "200 be1" && a != "503" && !strings.HasPrefix(a, "502") {
			t.Errorf("an answer while be2's web server was down: %q", a)
		}
	}
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be1" {
		t.Errorf(".jpg with be2 NOTAVAILABLE: %q, want the fallback rule's be1", got)
	}
	out := ctl(t, c, "fe", "backends")
	if !regexp.MustCompile(regexp.QuoteMeta(be2) + `:666\s+NOTAVAILABLE`).MatchString(out) {
		t.Errorf("tcphactl backends:\n%s", out)
	}

	if err := c.StartWWW("be2"); err != nil {
		t.Fatal(err)
	}
	took = waitBackend(t, c, be2, 1*2*time.Second+2*time.Second, "AVAILABLE", func(b *beStatus) bool { return b != nil && b.Available })
	t.Logf("be2 AVAILABLE %v after its web server came back", took.Round(time.Millisecond))
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be2" {
		t.Errorf(".jpg after be2 came back: %q", got)
	}
	// Each change is logged once, not per probe.
	log, _ := os.ReadFile(c.AgentLog("fe"))
	log = log[len(logBefore):]
	down := strings.Count(string(log), `msg="BE not available"`)
	up := strings.Count(string(log), `msg="BE available"`)
	if down != 1 || up != 1 {
		t.Errorf("the FE logged %d \"not available\" and %d \"available\" lines, want one each", down, up)
	}
}

// Dynamic registration: a third BE with dregister = 1 joins a running FE
// with its own rule, and leaves when it stops; a BE with the wrong secret
// is refused, and both sides say so.
func TestRegistration(t *testing.T) {
	c := newClusterWithout(t, cluster.Options{BEs: 4, Secret: "test-cluster-secret",
		Rules:      []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		Registered: []string{"be3", "be4"},
		BERules:    map[string][]string{"be3": {`rule = be3 \.txt$`}, "be4": {`rule = be4 \.txt$`}},
		FEExtra:    "dtcinterval = 1\n",
		Edit: func(host, conf string) string {
			if host == "be4" {
				return strings.Replace(conf, "secret = test-cluster-secret\n", "secret = not-the-cluster-secret\n", 1)
			}
			return conf
		},
	}, "be3", "be4")
	for _, h := range []string{"be1", "be3"} {
		os.WriteFile(filepath.Join(c.WWW(h), "doc.txt"), []byte("text from "+h+"\n"), 0o644)
	}
	fePID := c.AgentPID("fe")
	if got := servedBy(t, c, "/doc.txt"); got != "200 be1" {
		t.Fatalf("before be3 registers: %q", got)
	}
	if err := c.StartAgent("be3"); err != nil {
		t.Fatal(err)
	}
	be3 := c.BEs[2].IP
	took := waitBackend(t, c, be3, 10*time.Second, "registered and AVAILABLE", func(b *beStatus) bool {
		return b != nil && b.Registered && b.Available
	})
	t.Logf("be3 registered and AVAILABLE %v after its agent started", took.Round(time.Millisecond))
	for range 3 {
		if got := servedBy(t, c, "/doc.txt"); got != "200 be3" {
			t.Errorf("/doc.txt after be3 registered: %q", got)
		}
	}
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be2" {
		t.Errorf("the file's rules after be3 registered: %q", got)
	}
	if c.AgentPID("fe") != fePID {
		t.Errorf("the FE restarted")
	}

	// An FE upgrade keeps the registration: requests for be3's content
	// reach be3 throughout.
	answers := askWhile(c, "/doc.txt", func() {
		time.Sleep(300 * time.Millisecond)
		if err := c.UpgradeAgent("fe", true); err != nil {
			t.Error(err)
		}
		time.Sleep(time.Second)
	})
	var wrong []string
	for _, a := range answers {
		if a != "200 be3" {
			wrong = append(wrong, a)
		}
	}
	t.Logf("during the FE's upgrade: %d requests for be3's content, %d not served by be3 %v", len(answers), len(wrong), wrong)
	if len(wrong) > 0 {
		t.Errorf("%d of %d requests for be3's content went elsewhere during the FE's upgrade", len(wrong), len(answers))
	}
	fePID = c.AgentPID("fe")

	// The wrong secret: refused, logged on both sides, never scheduled.
	if err := c.StartAgent("be4"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	feSays := func() string { return c.Grep("fe", "peer="+c.BEs[3].IP+":") }
	for !strings.Contains(feSays(), "does not hold this cluster's secret") ||
		!strings.Contains(c.Grep("be4", "registration failed"), "does not hold this cluster's secret") {
		if time.Now().After(deadline) {
			t.Fatalf("no refusal logged:\nfe: %s\nbe4: %s", c.Grep("fe", "regist"), c.Grep("be4", "regist"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("refusal logged:\n%s\n%s", lastLine(feSays()), lastLine(c.Grep("be4", "registration failed")))
	if _, listed := backendsOf(t, c)[c.BEs[3].IP]; listed {
		t.Errorf("be4 is scheduled with a wrong secret")
	}

	// A BE that stops deregisters.
	if err := c.StopAgent("be3", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitBackend(t, c, be3, 5*time.Second, "gone", func(b *beStatus) bool { return b == nil })
	if got := servedBy(t, c, "/doc.txt"); got != "200 be1" {
		t.Errorf("/doc.txt after be3 left: %q", got)
	}
}

// wantShare fails unless n/total is within 10 % of want.
func wantShare(t *testing.T, what string, n, total int, want float64) {
	t.Helper()
	got := float64(n) / float64(total)
	t.Logf("%s: %d of %d (%.1f %%, want %.1f %% ± 10 %%)", what, n, total, 100*got, 100*want)
	if got < want*0.9 || got > want*1.1 {
		t.Errorf("%s: share %.3f, want %.3f within 10 %%", what, got, want)
	}
}

// Schedulers: lard keeps each URL of a 200-URL working set on one BE, in
// both accept modes (with accept = be the connections land on either BE
// by hash, and the BEs bind each URL alike: issue 14); wlc splits by
// weight.
func TestSchedulers(t *testing.T) {
	for _, accept := range []string{"fe", "be"} {
		t.Run("lard, accept = "+accept, func(t *testing.T) { testLARD(t, accept) })
	}
	t.Run("wlc by weight", testWLCByWeight)
	t.Run("wlc, accept = be: by the FE's load view", testWLCLoadView)
}

// With accept = be, connections land on either BE by hash; under wlc the
// BE a connection lands on moves its first request to the BE that the
// FE's load view says is less loaded per weight. be1 holds 40 idle
// keep-alive connections and be2 10 (rules send .hold to be1 alone and
// .hold2 to be2), so new one-request connections for the wlc rule end on
// be2, whichever BE they land on: be2, with its own 11, stays only
// because the view says be1 has 40 (without the view it would move them
// to a be1 it took for idle). Before, each was served where it landed:
// about half on be1.
func testWLCLoadView(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret",
		Rules:   []string{`rule = be1 \.hold$`, `rule = be2 \.hold2$`, `rule = be1,be2 .*`},
		FEExtra: "scheduler = wlc\naccept = be\ndtcinterval = 1\n"})
	waitPlaced(t, c)
	held := map[string]int{"be1": 40, "be2": 10}
	for be, n := range held {
		path := map[string]string{"be1": "/x.hold", "be2": "/x.hold2"}[be]
		os.WriteFile(filepath.Join(c.WWW(be), path), []byte("held\n"), 0o644)
		for range n {
			ka := dialKeepAlive(t, c)
			t.Cleanup(func() { ka.conn.Close() })
			if got, err := ka.get(path); err != nil || got != "200 "+be {
				t.Fatalf("held connection: %q %v", got, err)
			}
		}
	}
	// The FE's probes see them, and its next frame carries the view.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		rows := backendsOf(t, c)
		if rows[c.BEs[0].IP].Active >= held["be1"] && rows[c.BEs[1].IP].Active >= held["be2"] {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the FE sees %+v, want be1 40 and be2 10 active", rows)
		}
	}
	time.Sleep(1500 * time.Millisecond)
	args := []string{"curl", "-sS", "-m", "30", "-H", "Connection: close", "-w", "%header{x-served-by}\n"}
	for range 40 {
		args = append(args, "-o", "/dev/null", url+"/index.html")
	}
	out, err := c.Output(context.Background(), "client", args...)
	if err != nil {
		t.Fatal(err)
	}
	served := map[string]int{}
	for l := range strings.Lines(out) {
		served[strings.TrimSpace(l)]++
	}
	t.Logf("40 one-request connections with be1 holding 40 and be2 10: served %v", served)
	if served["be2"] < 36 {
		t.Errorf("served %v, want at least 36 of 40 on be2, the less loaded", served)
	}
}

func testLARD(t *testing.T, accept string) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Rules: []string{`rule = be1,be2 .*`},
		FEExtra: "scheduler = lard\naccept = " + accept + "\n"})
	if accept == "be" {
		waitPlaced(t, c)
	}
	var urls []string
	for i := range 200 {
		name := fmt.Sprintf("/set/%03d.html", i)
		for _, b := range c.BEs {
			os.MkdirAll(filepath.Join(c.WWW(b.Name), "set"), 0o755)
			os.WriteFile(filepath.Join(c.WWW(b.Name), name), []byte(name+"\n"), 0o644)
		}
		urls = append(urls, url+name)
	}
	// Three rounds, a new connection per request.
	args := []string{"curl", "-sS", "-m", "60", "-H", "Connection: close",
		"-w", "%{url_effective} %{http_code} %header{x-served-by}\n"}
	for range 3 {
		for _, u := range urls {
			args = append(args, "-o", "/dev/null", u)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := c.Output(ctx, "client", args...)
	if err != nil {
		t.Fatal(err)
	}
	by := map[string]map[string]int{}
	perBE := map[string]int{}
	for l := range strings.Lines(out) {
		f := strings.Fields(l)
		if len(f) != 3 || f[1] != "200" {
			t.Fatalf("answer %q", l)
		}
		if by[f[0]] == nil {
			by[f[0]] = map[string]int{}
		}
		by[f[0]][f[2]]++
		perBE[f[2]]++
	}
	split := 0
	for u, bes := range by {
		if len(bes) != 1 {
			split++
			t.Errorf("%s served by %v", u, bes)
		}
	}
	t.Logf("lard: %d URLs, %d requests; hits per BE %v; URLs on more than one BE: %d", len(by), 3*len(urls), perBE, split)
	if len(by) != 200 {
		t.Errorf("%d URLs answered, want 200", len(by))
	}
	if perBE["be1"] < 150 || perBE["be2"] < 150 {
		t.Errorf("hits per BE %v: the URLs are not spread over both", perBE)
	}
}

func testWLCByWeight(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Rules: []string{`rule = be1,be2 .*`},
		FEExtra: "scheduler = wlc\n", Weights: map[string]int{"be1": 3, "be2": 1}})
	be1, be2 := c.BEs[0].IP, c.BEs[1].IP
	// One connection at a time: the loads are equal at every choice,
	// and the requests split by weight.
	served := map[string]int{}
	args := []string{"curl", "-sS", "-m", "60", "-H", "Connection: close", "-w", "%header{x-served-by}\n"}
	for range 200 {
		args = append(args, "-o", "/dev/null", url+"/index.html")
	}
	out, err := c.Output(context.Background(), "client", args...)
	if err != nil {
		t.Fatal(err)
	}
	for l := range strings.Lines(out) {
		served[strings.TrimSpace(l)]++
	}
	wantShare(t, "sequential requests to be1 (weight 3)", served["be1"], 200, 0.75)
	wantShare(t, "sequential requests to be2 (weight 1)", served["be2"], 200, 0.25)

	// Under load, wlc keeps each BE's connections per weight equal:
	// sample them while wrk runs.
	before := backendsOf(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan string, 1)
	go func() {
		out, _ := c.Exec(ctx, "client", "wrk", "-t2", "-c16", "-d5s", "-H", "Connection: close", url+"/index.html").CombinedOutput()
		done <- string(out)
	}()
	var live1, live2 int
	time.Sleep(time.Second)
	for range 30 {
		rows := backendsOf(t, c)
		live1 += rows[be1].Live
		live2 += rows[be2].Live
		time.Sleep(100 * time.Millisecond)
	}
	out = <-done
	after := backendsOf(t, c)
	h1 := int(after[be1].Handoffs - before[be1].Handoffs)
	h2 := int(after[be2].Handoffs - before[be2].Handoffs)
	t.Logf("wrk -c16: %s; requests be1 %d, be2 %d (%.1f %% to be1: the busier BE's connections last longer on this shared machine)",
		strings.TrimSpace(lastLine(strings.SplitN(out, "Requests/sec", 2)[0])), h1, h2, 100*float64(h1)/float64(h1+h2))
	wantShare(t, "connections open on be1 under load, summed over 30 samples", live1, live1+live2, 0.75)
}

// drain: an in-flight 20 MB download finishes, new connections go to the
// other BE; enable undoes it. In both accept modes: with accept = be the
// drained BE loses its placement slots (issue 14), and the FE knows the
// download's BE by its probes (active) rather than its own table (live).
func TestDrain(t *testing.T) {
	for _, accept := range []string{"fe", "be"} {
		t.Run("accept = "+accept, func(t *testing.T) { testDrain(t, accept == "be") })
	}
}

func testDrain(t *testing.T, acceptBE bool) {
	extra := ""
	// Its connections: this FE's own, or with accept = be what the BE's
	// last probe reported (probes every second).
	conns := func(r beStatus) int { return r.Live }
	if acceptBE {
		extra = "accept = be\ndtcinterval = 1\n"
		conns = func(r beStatus) int { return r.Active }
	}
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Rules: []string{`rule = be1,be2 .*`},
		FEExtra: extra})
	if acceptBE {
		waitPlaced(t, c)
	}
	body := make([]byte, 20<<20)
	for i := range body {
		body[i] = byte(i * 7)
	}
	for _, b := range c.BEs {
		os.WriteFile(filepath.Join(c.WWW(b.Name), "big.bin"), body, 0o644)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dl := c.Exec(ctx, "client", "curl", "-sS", "--limit-rate", "5M", "-o", "/dev/null", "-D", "-",
		"-w", "size=%{size_download}\n", url+"/big.bin")
	var dlOut strings.Builder
	dl.Stdout = &dlOut
	if err := dl.Start(); err != nil {
		t.Fatal(err)
	}
	// Which BE took it: the one with a connection.
	var from, other string
	deadline := time.Now().Add(5 * time.Second)
	for from == "" {
		for a, r := range backendsOf(t, c) {
			if conns(r) > 0 {
				from = a
			} else {
				other = a
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no BE has the download's connection")
		}
		time.Sleep(50 * time.Millisecond)
	}
	placements := func() int { return strings.Count(c.Grep("fe", "placement changed"), "\n") }
	placed := placements()
	out := ctl(t, c, "fe", "drain", from)
	t.Logf("tcphactl drain %s: %s", from, strings.TrimSpace(out))
	if !strings.Contains(ctl(t, c, "fe", "backends"), "DRAINING") {
		t.Errorf("backends does not show the drain")
	}
	names := map[string]string{}
	for _, b := range c.BEs {
		names[b.IP] = b.Name
	}
	if acceptBE {
		// The drain pushes the cluster frame at once, and the slots
		// follow in the same push.
		for deadline := time.Now().Add(2 * time.Second); placements() == placed; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the drained BE kept its slots 2 s after the drain:\n%s", c.Grep("fe", "place"))
			}
		}
	}
	for range 10 {
		if got := servedBy(t, c, "/index.html"); got != "200 "+names[other] {
			t.Errorf("a new connection while %s drains: %q", from, got)
		}
	}
	if err := dl.Wait(); err != nil {
		t.Fatalf("the download: %v\n%s", err, dlOut.String())
	}
	if !strings.Contains(dlOut.String(), fmt.Sprintf("size=%d", len(body))) ||
		!strings.Contains(dlOut.String(), "X-Served-By: "+names[from]) {
		t.Errorf("the download:\n%s", dlOut.String())
	}
	waitBackend(t, c, from, 5*time.Second, "without connections", func(b *beStatus) bool { return b != nil && conns(*b) == 0 })
	ctl(t, c, "fe", "enable", from)
	seen := map[string]bool{}
	// With accept = be a connection lands by hash: more tries, so that
	// missing the enabled BE by chance is unlikely (2^-20).
	for range map[bool]int{false: 6, true: 20}[acceptBE] {
		seen[servedBy(t, c, "/index.html")] = true
	}
	if !seen["200 "+names[from]] {
		t.Errorf("after enable, %s gets nothing: %v", from, slices.Collect(maps.Keys(seen)))
	}
}

// Reload: a broken file changes nothing and is logged; a changed rule
// applies to new connections while open ones stay (with phttp = single:
// under multi their later requests follow the new rules too, as
// TestPHTTPReload shows); SIGHUP never stops the agent. tcphactl reload
// does the same and reports the error.
func TestReload(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Rules: []string{`rule = be1 .*`}, FEExtra: "phttp = single\n"})
	pid := c.AgentPID("fe")
	conf := c.ConfigFile("fe")
	good, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	hup := func() {
		t.Helper()
		if err := syscall.Kill(c.AgentPID("fe"), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	waitLog := func(msg string, n int) string {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if got := c.Grep("fe", msg); strings.Count(got, "\n") >= n {
				return lastLine(got)
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %q in the FE's log:\n%s", msg, c.Grep("fe", "reload"))
			}
		}
	}
	k := dialKeepAlive(t, c)
	defer k.conn.Close()
	if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
		t.Fatalf("before: %q %v", got, err)
	}

	broken := strings.Replace(string(good), "rule = "+c.BEs[0].IP+" .*", "rule = "+c.BEs[0].IP+" (unclosed", 1)
	os.WriteFile(conf, []byte(broken), 0o640)
	hup()
	line := waitLog(`msg="reload refused`, 1)
	t.Logf("broken file: %s", line)
	if !strings.Contains(line, "rule") {
		t.Errorf("the log does not say what is wrong: %s", line)
	}
	if got := servedBy(t, c, "/index.html"); got != "200 be1" {
		t.Errorf("after a refused reload: %q", got)
	}
	if out, err := ctlRun(c, "fe", "reload"); err == nil || !strings.Contains(out, "reload refused") {
		t.Errorf("tcphactl reload of a broken file: %v: %s", err, out)
	}

	changed := strings.Replace(string(good), "rule = "+c.BEs[0].IP+" .*", "rule = "+c.BEs[1].IP+" .*", 1)
	os.WriteFile(conf, []byte(changed), 0o640)
	hup()
	waitLog("msg=reloaded ", 1)
	if got := servedBy(t, c, "/index.html"); got != "200 be2" {
		t.Errorf("a new connection after the rule changed: %q, want be2", got)
	}
	if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
		t.Errorf("the connection opened before the reload: %q %v, want it still on be1", got, err)
	}
	os.WriteFile(conf, good, 0o640)
	if out := ctl(t, c, "fe", "reload"); !strings.Contains(out, "reloaded") {
		t.Errorf("tcphactl reload: %s", out)
	}
	if got := servedBy(t, c, "/index.html"); got != "200 be1" {
		t.Errorf("after tcphactl reload back: %q", got)
	}
	// Signals that arrive together may count as one reload.
	for range 3 {
		hup()
	}
	waitLog("msg=reloaded ", 3)
	if got := c.AgentPID("fe"); got != pid {
		t.Errorf("SIGHUP changed the agent: pid %d, was %d", got, pid)
	}
	if err := syscall.Kill(pid, 0); err != nil {
		t.Errorf("the agent is gone after SIGHUP: %v", err)
	}
}

// metricSum adds the samples whose name, with its labels, starts with
// prefix; -1 if there are none.
func metricSum(text, prefix string) float64 {
	sum, found := 0.0, false
	for l := range strings.Lines(text) {
		if !strings.HasPrefix(l, prefix) {
			continue
		}
		f := strings.Fields(l)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum, found = sum+v, true
		}
	}
	if !found {
		return -1
	}
	return sum
}

// /metrics after traffic shows the metrics the issue lists, with values
// that match the traffic; tcphactl's errors and formats are what scripts
// rely on.
func TestMetricsAndControl(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Metrics: true,
		Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}, FEExtra: "dtcinterval = 1\n"})
	for range 20 {
		servedBy(t, c, "/index.html")
	}
	for range 10 {
		servedBy(t, c, "/img/a.jpg")
	}
	// One keep-alive connection moved from be1 to be2 (phttp = multi).
	if out := curl(t, c, "-o", "/dev/null", "-w", "%header{x-served-by} ", url+"/index.html", "-o", "/dev/null", url+"/img/a.jpg"); out != "be1 be2 " {
		t.Errorf("keep-alive connection served by %q, want be1 then be2", out)
	}
	time.Sleep(2500 * time.Millisecond) // two probes, and the FINs seen
	out, err := c.Output(context.Background(), "fe", "curl", "-sS", "http://"+cluster.MetricsAddr+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	be1, be2 := c.BEs[0].IP, c.BEs[1].IP
	// Each sample (or the sum of a family's) and the least value the
	// traffic above makes plausible.
	atLeast := map[string]float64{
		`tcpha_handoffs_total{result="ok"}`:                       31,
		`tcpha_handoff_duration_seconds_count`:                    31,
		`tcpha_migrations_total{result="ok"}`:                     1,
		`tcpha_backend_up{backend="` + be1 + `"} 1`:               1,
		`tcpha_backend_up{backend="` + be2 + `"} 1`:               1,
		`tcpha_backend_handoffs_total{backend="` + be1 + `"}`:     21,
		`tcpha_backend_handoffs_total{backend="` + be2 + `"}`:     11,
		`tcpha_backend_weight{backend="` + be1 + `"}`:             1,
		`tcpha_backend_failures_total{backend="` + be1 + `"}`:     0,
		`tcpha_backend_active_connections{backend="` + be1 + `"}`: 0,
		`tcpha_backend_live_connections{backend="` + be1 + `"}`:   0,
		`tcpha_connections{state="TIME_WAIT"}`:                    1,
		`tcpha_connections{state="HANDOFFED"}`:                    0,
		`tcpha_forwarded_packets_total`:                           30,
		`tcpha_forwarded_bytes_total`:                             30 * 40,
		`tcpha_nfqueue_packets_total{event="fin"`:                 30,
		`tcpha_nfqueue_dropped_total`:                             0,
		`tcpha_probes_total{backend="` + be1 + `",result="ok"}`:   2,
		`tcpha_probes_total{backend="` + be2 + `",result="ok"}`:   2,
	}
	for name, least := range atLeast {
		if v := metricSum(out, name); v < least {
			t.Errorf("%s = %v, want at least %v", name, v, least)
		}
	}
	if v := metricSum(out, `tcpha_handoffs_total{result="ok"}`); v != 31 {
		t.Errorf("tcpha_handoffs_total ok = %v, want the 31 connections", v)
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", out)
	}

	// tcphactl: -c finds the socket; errors exit 1, usage errors 2.
	if out, err := exec.Command(ctlBin, "-c", c.ConfigFile("fe"), "status").CombinedOutput(); err != nil || !strings.Contains(string(out), "fe vip=") {
		t.Errorf("tcphactl -c CONFIG status: %v: %s", err, out)
	}
	exit := func(err error) int {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode()
		}
		if err != nil {
			return -1
		}
		return 0
	}
	for _, tc := range []struct {
		args []string
		code int
		say  string
	}{
		{[]string{"frobnicate"}, 1, `unknown command "frobnicate"`},
		{[]string{"weight", "10.77.0.99", "2"}, 1, "10.77.0.99"},
		{[]string{"weight", c.BEs[0].IP, "x"}, 1, `weight "x"`},
		{[]string{"loglevel", "9"}, 1, "0 to 6"},
		{[]string{"drain"}, 1, "drain takes 1 argument"},
		{[]string{"-o", "yaml", "status"}, 2, "usage"},
		{[]string{}, 2, "usage"},
		{[]string{"dtcinterval", "-5"}, 1, "not negative"},
		{[]string{"dtcinterval", "2"}, 0, "dtcinterval 2s"},
		{[]string{"loglevel", "5"}, 0, "loglevel 5"},
	} {
		out, err := ctlRun(c, "fe", tc.args...)
		if code := exit(err); code != tc.code || !strings.Contains(out, tc.say) {
			t.Errorf("tcphactl %v: exit %d, %q; want exit %d saying %q", tc.args, code, out, tc.code, tc.say)
		}
	}
	var st struct {
		PID int `json:"pid"`
		FE  any `json:"fe"`
	}
	if out := ctl(t, c, "fe", "-o", "json", "status"); json.Unmarshal([]byte(out), &st) != nil || st.PID != c.AgentPID("fe") || st.FE == nil {
		t.Errorf("tcphactl -o json status: %s", out)
	}
	// conns on a BE: the connections its relay serves.
	k := dialKeepAlive(t, c)
	defer k.conn.Close()
	for range 2 {
		if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
			t.Fatalf("keep-alive: %q %v", got, err)
		}
	}
	out = ctl(t, c, "be1", "conns")
	if !regexp.MustCompile(regexp.QuoteMeta(k.local()) + `\s+ESTABLISHED idle\s+\S+\s+2\b`).MatchString(out) {
		t.Errorf("tcphactl conns on be1, want %s with 2 requests:\n%s", k.local(), out)
	}
	if out, err := ctlRun(c, "be1", "backends"); err == nil || !strings.Contains(out, "no fe role") {
		t.Errorf("backends on a BE: %v %q", err, out)
	}
	if out := ctl(t, c, "fe", "weight", c.BEs[0].IP, "5"); !strings.Contains(out, "weight") ||
		backendsOf(t, c)[c.BEs[0].IP].Weight != 5 {
		t.Errorf("weight: %s\n%s", out, ctl(t, c, "fe", "backends"))
	}
}

// SIGTERM drain counts only live connections, and when it runs out the
// ones left are reset (the BE sends the client a RST) instead of hanging.
func TestStopDrainResets(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 1, Secret: "test-cluster-secret", Rules: []string{`rule = be1 .*`},
		FEExtra: "drain = 2\ntimewait = 60\n"})
	// More than the sockets' buffers hold, so the cut shows at the client.
	const size = 100 << 20
	f, err := os.Create(filepath.Join(c.WWW("be1"), "big.bin"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	// A closed connection, in TIME_WAIT for a minute, must not hold the stop.
	servedBy(t, c, "/index.html")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dl := c.Exec(ctx, "client", "curl", "-sS", "--limit-rate", "1M", "-o", "/dev/null", "-w", "%{size_download}", url+"/big.bin")
	var out strings.Builder
	dl.Stderr, dl.Stdout = &out, &out
	if err := dl.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	start := time.Now()
	if err := c.StopAgent("fe", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	stopped := time.Since(start)
	// The client's socket is reset at once (curl reads what its buffers
	// hold first).
	if ss, _ := c.Output(context.Background(), "client", "ss", "-tn", "state", "established"); strings.Contains(ss, cluster.VIP) {
		t.Errorf("the download's connection is still established after the stop:\n%s", ss)
	}
	err = dl.Wait()
	t.Logf("the FE stopped in %v; the download ended %v after SIGTERM: %v %s", stopped.Round(time.Millisecond),
		time.Since(start).Round(time.Millisecond), err, strings.TrimSpace(out.String()))
	if stopped > 6*time.Second {
		t.Errorf("the stop took %v with drain = 2", stopped)
	}
	if err == nil || !strings.Contains(out.String(), "reset") {
		t.Errorf("the cut download was not reset: %v %s", err, out.String())
	}
	if !strings.Contains(c.Grep("be1", "connection reset"), cluster.ClientIP) {
		t.Errorf("be1 did not log the reset:\n%s", c.Grep("be1", "reset"))
	}
	if !strings.Contains(c.Grep("fe", `msg="connections reset"`), "reset=1 ") {
		t.Errorf("the FE's log:\n%s", c.Grep("fe", "reset"))
	}
}
