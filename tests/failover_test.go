package tests

import (
	"bufio"
	"context"
	"crypto/md5"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"tcpha/internal/bench"
	cluster "tcpha/internal/nscluster"
)

// pairConf is etc/keepalived.conf for one FE of the pair: its VIP, its
// priority, the test's tcphactl and that FE's agent config.
func pairConf(t *testing.T, c *cluster.Cluster, host string, priority int) string {
	t.Helper()
	b, err := os.ReadFile("../etc/keepalived.conf")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for old, new := range map[string]string{
		"192.168.1.36/32":            cluster.VIP + "/32",
		"/usr/local/bin/tcphactl":    ctlBin,
		"/etc/tcpha/tcpha.conf":      c.ConfigFile(host),
		"vrrp_garp_master_delay 5\n": "vrrp_garp_master_delay 1\n",
		"priority 100\n":             fmt.Sprintf("priority %d\n", priority),
	} {
		if !strings.Contains(s, old) {
			t.Fatalf("etc/keepalived.conf no longer says %q", old)
		}
		s = strings.ReplaceAll(s, old, new)
	}
	path := filepath.Join(c.Dir, "keepalived-"+host+".conf")
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// feHost is one FE of the pair with its keepalived.
type feHost struct {
	name, conf string
	pidMain    string // keepalived's parent
	pidVRRP    string // its VRRP child
}

func (h *feHost) startKeepalived(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	if _, err := c.StartDaemon(h.name, "keepalived-"+h.name, "keepalived", "-n", "-l", "-D", "-P", "-f", h.conf,
		"-p", h.pidMain, "-r", h.pidVRRP); err != nil {
		t.Fatal(err)
	}
}

// crash is the failover: the FE's link goes down, and its agent and
// keepalived die with SIGKILL together, so nothing leaves the host: no
// priority-0 advertisement, no goodbye on a control session.
func (h *feHost) crash(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	if out, err := c.Output(context.Background(), h.name, "ip", "link", "set", "eth0", "down"); err != nil {
		t.Fatalf("link down on %s: %v %s", h.name, err, out)
	}
	pid := c.AgentPID(h.name)
	if err := c.StopAgentAsync(h.name, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for _, pf := range []string{h.pidVRRP, h.pidMain} {
		if b, err := os.ReadFile(pf); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	}
	if err := c.WaitAgent(h.name, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if syscall.Kill(pid, 0) == nil {
		t.Fatalf("the agent of %s (pid %d) survived SIGKILL", h.name, pid)
	}
}

// holds tells whether host's eth0 holds the VIP.
func holds(c *cluster.Cluster, host string) bool {
	out, _ := c.Output(context.Background(), host, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
	return strings.Contains(out, " "+cluster.VIP+"/")
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !ok() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return time.Since(start)
}

// handoffed returns the HANDOFFED flows of host's FE (tcphactl conns).
func handoffed(c *cluster.Cluster, host string) map[string]bool {
	out, err := c.Admin(host, "conns")
	if err != nil {
		return nil
	}
	m := map[string]bool{}
	for l := range strings.Lines(out) {
		if f := strings.Fields(l); len(f) >= 3 && f[2] == "HANDOFFED" {
			m[f[0]+" "+f[1]] = true
		}
	}
	return m
}

// takeovers reads a capture of the client's packets on a BE (tcpdump -e)
// and returns, for each change of the forwarding FE's MAC, the gap between
// the last packet forwarded by the old FE and the first by the new.
func takeovers(t *testing.T, c *cluster.Cluster, host, pcap string) []string {
	t.Helper()
	out, err := c.Output(context.Background(), host, "tcpdump", "-r", pcap, "-tt", "-e", "-n")
	if err != nil {
		t.Fatalf("read the capture: %v", err)
	}
	names := map[string]string{}
	for _, h := range []string{"fe", "fe2"} {
		mac, _ := c.MAC(h)
		names[mac] = h
	}
	var res []string
	var lastT float64
	lastMAC := ""
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		ts, err := strconv.ParseFloat(f[0], 64)
		if err != nil || names[f[1]] == "" {
			continue
		}
		if lastMAC != "" && f[1] != lastMAC {
			res = append(res, fmt.Sprintf("%s→%s %.0f ms", names[lastMAC], names[f[1]], (ts-lastT)*1000))
		}
		lastT, lastMAC = ts, f[1]
	}
	return res
}

// bigFile writes n pseudo-random bytes to path and returns their md5.
func bigFile(t *testing.T, path string, n int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := md5.New()
	r := rand.NewChaCha8([32]byte{17})
	if _, err := io.CopyN(io.MultiWriter(f, h), r, n); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// Issue 17, item 2: two FEs under keepalived, [fe] syncpeer on both. The
// active FE fails hard (link down, agent and keepalived killed with -9)
// under a rate-limited 200 MB download and wrk keep-alive load; the other
// takes over with every flow already in its kernel: the download's md5 is
// intact and wrk sees no failed request. The old master comes back (nopreempt:
// it stays standby), the new master resyncs it, and a second failover back to
// it keeps both the first download and one started while it was away.
func TestSyncFailover(t *testing.T) {
	c, fes := syncPair(t, "", cluster.Options{Rules: []string{`rule = be1 \.bin$`, `rule = be2 .*`}})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	sumA := bigFile(t, filepath.Join(c.WWW("be1"), "a.bin"), 200<<20)
	sumB := bigFile(t, filepath.Join(c.WWW("be1"), "b.bin"), 40<<20)
	waitPairServes(t, c, "be2")
	if holds(c, "fe2") {
		t.Fatal("both FEs hold the VIP")
	}

	// The client's packets as be1 sees them, with the forwarding FE's MAC.
	pcap := filepath.Join(c.Dir, "be1-client.pcap")
	tcpdump := c.Exec(ctx, "be1", "tcpdump", "-i", "eth0", "-U", "-s", "96", "-w", pcap,
		"src host "+cluster.ClientIP+" and dst host "+cluster.VIP+" and dst port 80")
	if err := tcpdump.Start(); err != nil {
		t.Fatal(err)
	}
	fetch := func(path, rate string) chan string {
		done := make(chan string, 1)
		go func() {
			out, err := c.Output(ctx, "client", "bash", "-c",
				"set -o pipefail; curl -sS --limit-rate "+rate+" "+url+path+" | md5sum")
			if err != nil {
				done <- err.Error()
				return
			}
			done <- strings.Fields(out + " x")[0]
		}()
		return done
	}
	dlA := fetch("/a.bin", "8M") // about 25 s
	wrkDone := make(chan string, 1)
	go func() {
		out, _ := c.Exec(ctx, "client", "wrk", "-t1", "-c8", "-d26s", "--timeout", "15s", "--latency", url+"/index.html").CombinedOutput()
		wrkDone <- string(out)
	}()
	// One request per connection: those inside the dead FE's accept path
	// (read, handoff) when it dies fail; they are counted.
	closeDone := make(chan string, 1)
	go func() {
		out, _ := c.Exec(ctx, "client", "wrk", "-t1", "-c4", "-d26s", "--timeout", "15s", "-H", "Connection: close", url+"/index.html").CombinedOutput()
		closeDone <- string(out)
	}()
	time.Sleep(4 * time.Second)
	if n := len(handoffed(c, "fe2")); n < 9 {
		t.Errorf("the standby knows %d flows before the failover, want the download and wrk's 8 connections", n)
	}

	// Failover 1: fe dies.
	fes["fe"].crash(t, c)
	took := waitFor(t, 15*time.Second, "fe2 takes the VIP", func() bool { return holds(c, "fe2") })
	t.Logf("fe2 holds the VIP %v after fe died", took.Round(10*time.Millisecond))
	dlB := fetch("/b.bin", "2M") // started while fe is away: about 20 s
	time.Sleep(2 * time.Second)

	// The old master comes back: standby (nopreempt), resynced by fe2.
	if out, err := c.Output(ctx, "fe", "ip", "link", "set", "eth0", "up"); err != nil {
		t.Fatalf("link up: %v %s", err, out)
	}
	if err := c.StartAgent("fe"); err != nil {
		t.Fatal(err)
	}
	if st, err := c.Admin("fe", "status"); err != nil || !strings.Contains(st, fmt.Sprintf("pid=%d ", c.AgentPID("fe"))) {
		t.Fatalf("the restarted agent on fe does not answer: %v\n%s", err, st)
	}
	fes["fe"].startKeepalived(t, c)
	waitFor(t, 15*time.Second, "fe knows every flow of fe2 after its resync", func() bool {
		now, back := handoffed(c, "fe2"), handoffed(c, "fe")
		if len(now) < 10 {
			return false // the download started while fe was away is not handed off yet
		}
		for k := range now {
			if !back[k] {
				return false
			}
		}
		return true
	})
	if holds(c, "fe") {
		t.Error("the returning FE took the VIP back (nopreempt)")
	}
	if st, err := c.Admin("fe", "status"); err != nil || !strings.Contains(st, "standby session=") {
		t.Errorf("status of the returning FE: %v\n%s", err, st)
	}
	// tcphactl -o json status has the sync, by tcphactl(8)'s rules.
	js, err := exec.Command(ctlBin, "-s", c.AdminSocket("fe2"), "-o", "json", "status").Output()
	var v map[string]any
	if err := errors.Join(err, json.Unmarshal(js, &v)); err != nil {
		t.Fatalf("tcphactl -o json status on fe2: %v %s", err, js)
	}
	for _, b := range jsonRules("fe2 status", v) {
		t.Error(b)
	}
	feSt, _ := v["fe"].(map[string]any)
	if sy, _ := feSt["sync"].(map[string]any); sy["active"] != true || sy["peer"] != cluster.FEIP || sy["session"] != true {
		t.Errorf("fe2's sync status: %v", feSt["sync"])
	}

	// Failover 2: back to fe, which must not have lost the flow created
	// while it was away.
	time.Sleep(time.Second)
	fes["fe2"].crash(t, c)
	took = waitFor(t, 15*time.Second, "fe takes the VIP back", func() bool { return holds(c, "fe") })
	t.Logf("fe holds the VIP %v after fe2 died", took.Round(10*time.Millisecond))

	for name, w := range map[string]struct {
		ch  chan string
		sum string
	}{"200 MB download": {dlA, sumA}, "40 MB download started while fe was away": {dlB, sumB}} {
		if got := <-w.ch; got != w.sum {
			t.Errorf("%s across the failovers: %q, want md5 %s", name, got, w.sum)
		}
	}
	out := <-wrkDone
	w, err := bench.ParseWrk(out)
	if err != nil {
		t.Fatalf("wrk: %v\n%s", err, out)
	}
	t.Logf("wrk keep-alive across both failovers: %d requests, %d non-2xx, %d socket errors, p99 %v", w.Requests, w.Non2xx, w.SocketErrors, w.P99)
	if w.Requests == 0 || w.Non2xx != 0 || w.SocketErrors != 0 {
		t.Errorf("wrk keep-alive requests failed across the failovers:\n%s", out)
	}
	out = <-closeDone
	if w, err = bench.ParseWrk(out); err != nil {
		t.Fatalf("wrk: %v\n%s", err, out)
	}
	t.Logf("wrk one request per connection across both failovers: %d requests, %d non-2xx, %d socket errors", w.Requests, w.Non2xx, w.SocketErrors)
	if st, err := c.Admin("fe", "status"); err == nil {
		t.Logf("fe after the failover back:\n%s", st)
	}
	// At most the 4 connections in flight at each of the two failovers; a
	// failed one can count twice, as a non-2xx answer (a 503 of the new
	// master whose handoff failed) and as a socket error.
	if w.Requests == 0 || w.Non2xx+w.SocketErrors > 16 {
		t.Errorf("wrk one request per connection: more failures than connections in flight:\n%s", out)
	}
	tcpdump.Process.Signal(syscall.SIGTERM)
	tcpdump.Wait()
	gaps := takeovers(t, c, "be1", pcap)
	t.Logf("takeover, last packet forwarded by the old FE to the first by the new (be1's capture): %s", strings.Join(gaps, "; "))
	if len(gaps) != 2 {
		t.Errorf("forwarding changed FE %d times in be1's capture, want 2: %v", len(gaps), gaps)
	}
}

// syncPair is the cluster of TestSyncFailover: two FEs under keepalived
// with syncpeer each other, fe the master, two BEs; extra is more [fe].
func syncPair(t *testing.T, extra string, opts cluster.Options) (*cluster.Cluster, map[string]*feHost) {
	t.Helper()
	opts.BEs, opts.FE2, opts.Secret = 2, true, "failover-secret-16"
	opts.FEExtra = "vip = keepalived\n" + extra
	opts.Edit = func(host, conf string) string {
		switch host {
		case "fe":
			return conf + "syncpeer = " + cluster.FE2IP + "\n"
		case "fe2":
			return conf + "syncpeer = " + cluster.FEIP + "\n"
		}
		return conf
	}
	c := newClusterWithout(t, opts, "fe")
	fes := map[string]*feHost{}
	for _, h := range []string{"fe", "fe2"} {
		if err := c.StartAgent(h); err != nil {
			t.Fatal(err)
		}
		fes[h] = &feHost{name: h, pidMain: filepath.Join(c.Dir, h+"-keepalived.pid"), pidVRRP: filepath.Join(c.Dir, h+"-vrrp.pid")}
	}
	fes["fe"].conf = pairConf(t, c, "fe", 100)
	fes["fe2"].conf = pairConf(t, c, "fe2", 90)
	fes["fe"].startKeepalived(t, c)
	waitFor(t, 15*time.Second, "keepalived makes fe the master", func() bool { return holds(c, "fe") })
	fes["fe2"].startKeepalived(t, c)
	return c, fes
}

// Issue 17's acceptance with accept = be: wrk one request per connection
// (and keep-alive) across a hard failover of the active FE, zero failed
// requests. The FE accepts no connection, so none dies with it; the
// standby places new flows as the dead FE did (the same slot map), and a
// BE-to-BE move whose switch the dead FE never answered is asked of the
// new active FE (handoff.AskFEsAgain) instead of cut: before, each such
// move reset its client (1 and 4 in two runs).
func TestSyncFailoverAcceptBE(t *testing.T) {
	c, fes := syncPair(t, "accept = be\n", cluster.Options{PublicWWW: true, Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, h := range []string{"fe", "fe2"} {
		waitFor(t, 10*time.Second, h+" places flows on both BEs", func() bool { return strings.Contains(c.Grep(h, "placement changed"), "10.77.0.12=") })
	}
	waitPairServes(t, c, "be1")
	if holds(c, "fe2") {
		t.Fatal("both FEs hold the VIP")
	}
	wrk := func(args ...string) chan string {
		ch := make(chan string, 1)
		go func() {
			out, _ := c.Exec(ctx, "client", append([]string{"wrk", "-t1", "-c4", "-d12s", "--timeout", "10s"}, append(args, url+"/index.html")...)...).CombinedOutput()
			ch <- string(out)
		}()
		return ch
	}
	closeDone, kaDone := wrk("-H", "Connection: close"), wrk()
	time.Sleep(3 * time.Second)
	// The FE's answers to the BEs are lost for a moment before it dies:
	// the BE-to-BE moves under way then wait on a switch the FE carried
	// out (and synced) without answering, as those in flight at a crash do.
	hold := fmt.Sprintf("add table ip hold { chain out { type filter hook output priority 0; ip daddr { %s, %s } tcp dport 666 drop; }; }",
		c.BEs[0].IP, c.BEs[1].IP)
	if out, err := c.Output(ctx, "fe", "nft", hold); err != nil {
		t.Fatalf("hold the FE's answers: %v %s", err, out)
	}
	time.Sleep(300 * time.Millisecond)
	fes["fe"].crash(t, c)
	took := waitFor(t, 15*time.Second, "fe2 takes the VIP", func() bool { return holds(c, "fe2") })
	t.Logf("fe2 holds the VIP %v after fe died", took.Round(10*time.Millisecond))
	for name, ch := range map[string]chan string{"one request per connection": closeDone, "keep-alive": kaDone} {
		out := <-ch
		w, err := bench.ParseWrk(out)
		if err != nil {
			t.Fatalf("wrk %s: %v\n%s", name, err, out)
		}
		t.Logf("wrk %s across the failover: %d requests, %d non-2xx, %d socket errors", name, w.Requests, w.Non2xx, w.SocketErrors)
		if w.Requests == 0 || w.Non2xx+w.SocketErrors != 0 {
			t.Errorf("wrk %s: requests failed across the failover:\n%s", name, out)
		}
	}
	// The moves caught by the failover were switched by fe2 once it
	// held the VIP, seconds later, instead of cut.
	slow1, slow2 := slowMoves(c, "be1"), slowMoves(c, "be2")
	t.Logf("moves that waited for the takeover: be1 %q, be2 %q", slow1, slow2)
	if len(slow1)+len(slow2) == 0 {
		t.Error("no move waited for the takeover: the test did not catch one in flight")
	}
}

// slowMoves are the latencies of host's moves that took over a second.
func slowMoves(c *cluster.Cluster, host string) []string {
	var out []string
	for l := range strings.Lines(c.Grep(host, "connection moved")) {
		if i := strings.LastIndex(l, "latency="); i >= 0 {
			if d, err := time.ParseDuration(strings.TrimSpace(l[i+len("latency="):])); err == nil && d > time.Second {
				out = append(out, d.Round(time.Millisecond).String())
			}
		}
	}
	return out
}

// With accept = be, flows the kernel pinned before a slot change follow
// their pin, not the hash: the active FE sends those pins to its peer
// (fe.syncPins), so a failover keeps them. be2 starts with weight 0 on
// both FEs, so wrk's keep-alive connections (be1's content) are all placed
// on be1; then be2's weight goes to 1, about half the slots go to be2,
// and the connections in them stay pinned to be1. The FE dies; the
// keep-alive requests go on through fe2 with no failure. Without the
// pins, fe2 sent those connections to be2 by hash, which reset them.
func TestSyncFailoverPins(t *testing.T) {
	c, fes := syncPair(t, "accept = be\n", cluster.Options{PublicWWW: true, Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, h := range []string{"fe", "fe2"} {
		waitFor(t, 10*time.Second, h+" places flows on both BEs", func() bool { return strings.Contains(c.Grep(h, "placement changed"), "10.77.0.12=") })
	}
	be1, be2 := c.BEs[0].IP, c.BEs[1].IP
	placed := func(h, want string) func() bool {
		return func() bool {
			log := c.Grep(h, "placement changed")
			return strings.HasSuffix(strings.TrimSpace(log), want)
		}
	}
	for _, h := range []string{"fe", "fe2"} {
		ctl(t, c, h, "weight", be2, "0")
		waitFor(t, 5*time.Second, h+" places everything on be1", placed(h, "["+be1+"=4096]\""))
	}
	waitPairServes(t, c, "be1")
	kaDone := make(chan string, 1)
	go func() {
		out, _ := c.Exec(ctx, "client", "wrk", "-t1", "-c8", "-d12s", "--timeout", "10s", url+"/index.html").CombinedOutput()
		kaDone <- string(out)
	}()
	time.Sleep(2 * time.Second)
	for _, h := range []string{"fe", "fe2"} {
		ctl(t, c, h, "weight", be2, "1")
		waitFor(t, 5*time.Second, h+" gives be2 slots again", placed(h, be2+"=2079]\""))
	}
	time.Sleep(2 * time.Second) // the pins read and synced
	fes["fe"].crash(t, c)
	took := waitFor(t, 15*time.Second, "fe2 takes the VIP", func() bool { return holds(c, "fe2") })
	t.Logf("fe2 holds the VIP %v after fe died", took.Round(10*time.Millisecond))
	out := <-kaDone
	w, err := bench.ParseWrk(out)
	if err != nil {
		t.Fatalf("wrk: %v\n%s", err, out)
	}
	t.Logf("wrk keep-alive across the slot change and the failover: %d requests, %d non-2xx, %d socket errors", w.Requests, w.Non2xx, w.SocketErrors)
	if w.Requests == 0 || w.Non2xx+w.SocketErrors != 0 {
		t.Errorf("wrk keep-alive: requests failed:\n%s", out)
	}
	synced := c.Grep("fe", "off their slot")
	t.Logf("pins synced: %s", synced)
	if !strings.Contains(synced, "off_slot=") || strings.Contains(synced, "off_slot=0 ") {
		t.Error("no pin was off its slot: the test did not exercise the pins' sync")
	}
}

// waitPairServes waits until fe serves through the VIP (be answering
// tryCurl), then lets fe2's keepalived settle as BACKUP.
func waitPairServes(t *testing.T, c *cluster.Cluster, be string) {
	t.Helper()
	waitFor(t, 10*time.Second, "fe serves through the VIP", func() bool {
		out, err := tryCurl(c)
		return err == nil && out == "200 "+be
	})
	time.Sleep(2 * time.Second)
}
