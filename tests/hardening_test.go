package tests

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tcpha/handoff/wire"
	"tcpha/internal/bench"
	cluster "tcpha/internal/nscluster"
	"tcpha/internal/privtest"
	"tcpha/internal/testlog"
)

// statusOf reads `name=N` from host's `tcphactl status`.
func statusOf(t *testing.T, c *cluster.Cluster, host, name string) int {
	t.Helper()
	st, err := c.Admin(host, "status")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`\b` + regexp.QuoteMeta(name) + `=(\d+)`).FindStringSubmatch(st)
	if m == nil {
		t.Fatalf("no %s in %s's status:\n%s", name, host, st)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// capture is tcpdump writing host's eth0 to a file until stopped.
type capture struct {
	cmd  *exec.Cmd
	file string
	errb *testlog.Buffer
}

func startCapture(t *testing.T, c *cluster.Cluster, host, filter string) *capture {
	t.Helper()
	file := filepath.Join(c.Dir, fmt.Sprintf("%s-%d.pcap", host, time.Now().UnixNano()))
	// --immediate-mode: packets reach tcpdump as they come, not when a ring
	// block fills or times out, which a stop would cut short.
	args := append([]string{"tcpdump", "-i", "eth0", "-n", "--immediate-mode", "-U", "-w", file}, strings.Fields(filter)...)
	cp := &capture{cmd: c.Exec(context.Background(), host, args...), file: file, errb: &testlog.Buffer{}}
	cp.cmd.Stderr = cp.errb
	if err := cp.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(cp.errb.String(), "listening on") {
		if time.Now().After(deadline) {
			cp.cmd.Process.Kill()
			t.Fatalf("tcpdump on %s did not start: %s", host, cp.errb.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return cp
}

// stop ends the capture and returns how many packets it captured.
func (cp *capture) stop(t *testing.T) int {
	t.Helper()
	time.Sleep(200 * time.Millisecond) // what is in flight
	cp.cmd.Process.Signal(os.Interrupt)
	cp.cmd.Wait()
	m := regexp.MustCompile(`(\d+) packets? captured`).FindStringSubmatch(cp.errb.String())
	if m == nil {
		t.Fatalf("tcpdump said: %s", cp.errb.String())
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// sendRaw connects from host to addr, writes b, and returns what came back
// before the connection ended (or 3 s passed).
func sendRaw(t *testing.T, c *cluster.Cluster, host, addr string, b []byte) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := c.Dial(ctx, host, 0, addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, host, err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	conn.Write(b)
	got, _ := io.ReadAll(conn)
	return got
}

// craftedOffer is an unauthenticated session that offers the BE a made-up
// connection: what a stranger who knows the protocol would send.
func craftedOffer(t *testing.T, from string) []byte {
	h := wire.Hello{Role: wire.RoleFE, Addr: netip.MustParseAddrPort(from + ":0"),
		VIP: netip.AddrPortFrom(netip.MustParseAddr(cluster.VIP), cluster.Port)}
	hp, _ := h.MarshalBinary()
	b, _ := wire.AppendFrame(nil, wire.Frame{Type: wire.TypeHello, Payload: hp}, nil)
	ci := wire.ConnInfo{Client: netip.MustParseAddrPort("203.0.113.7:4000"),
		VIP: netip.AddrPortFrom(netip.MustParseAddr(cluster.VIP), cluster.Port), MSS: 1460,
		RecvQueue: []byte("GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")}
	cp, _ := ci.MarshalBinary()
	b, _ = wire.AppendFrame(b, wire.Frame{Type: wire.TypeOffer, ID: 1, ConnMagic: ci.ConnMagic(), Payload: cp}, nil)
	fp, _ := wire.Flow{Client: ci.Client}.MarshalBinary()
	b, _ = wire.AppendFrame(b, wire.Frame{Type: wire.TypeCommit, ID: 1, Payload: fp}, nil)
	return b
}

// Nobody outside drives a BE (issue 8): a crafted offer, and the FE's own
// control traffic captured and replayed byte for byte, get no answer and
// cause no segment from the VIP, and a replay from the FE's own address is
// refused for its proof. (A cluster without a secret no longer exists:
// issue 19.)
func TestStrangersDriveNoBE(t *testing.T) {
	secret := "the-cluster-secret"
	privtest.Require(t)
	c, err := cluster.New(cluster.Options{Agent: agentBin, BEs: 1, Secret: secret, Mallory: true,
		Rules: []string{`rule = be1 .*`}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dumpLogs(t, c); c.Close() })
	if err := c.StartAgent("be1"); err != nil {
		t.Fatal(err)
	}
	// The FE's sessions, from their first byte.
	ctlAddr := netip.AddrPortFrom(netip.MustParseAddr(c.BEs[0].IP), 666)
	rec := startCapture(t, c, "be1", "tcp port 666")
	if err := c.StartAgent("fe"); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if got := servedBy(t, c, "/index.html"); got != "200 be1" {
			t.Fatalf("request: %q", got)
		}
	}
	n := rec.stop(t)
	st, _ := os.Stat(rec.file)
	t.Logf("capture: %d packets, file %v", n, st.Size())
	segs, err := readPcap(rec.file)
	if err != nil {
		t.Fatal(err)
	}
	replay := streamFrom(segs, netip.MustParseAddr(cluster.FEIP), ctlAddr)
	if len(replay) < 200 {
		var syns, withData int
		for _, s := range segs {
			if s.syn {
				syns++
			}
			if len(s.payload) > 0 {
				withData++
			}
		}
		t.Fatalf("captured only %d bytes of the FE's control traffic (%d segments, %d SYNs, %d with data)",
			len(replay), len(segs), syns, withData)
	}
	served := statusOf(t, c, "be1", "served")

	// Whatever reaches the client from the VIP while strangers try.
	watch := startCapture(t, c, "client", "src host "+cluster.VIP)
	for _, host := range []string{"client", "mallory"} {
		ip := map[string]string{"client": cluster.ClientIP, "mallory": cluster.MalloryIP}[host]
		if got := sendRaw(t, c, host, ctlAddr.String(), craftedOffer(t, ip)); len(got) != 0 {
			t.Errorf("crafted offer from %s got %d bytes back", host, len(got))
		}
		if got := sendRaw(t, c, host, ctlAddr.String(), replay); len(got) != 0 {
			t.Errorf("replay from %s got %d bytes back", host, len(got))
		}
	}
	// From the FE's own address the member check passes; the handshake
	// does not: the BE's nonce is new.
	sendRaw(t, c, "fe", ctlAddr.String(), replay)
	if n := watch.stop(t); n != 0 {
		t.Errorf("%d segments from the VIP reached the client during the attempts", n)
	}
	if got := statusOf(t, c, "be1", "served"); got != served {
		t.Errorf("be1 served %d handoffs during the attempts", got-served)
	}
	log, _ := os.ReadFile(c.AgentLog("be1"))
	if !strings.Contains(string(log), "wrong proof") {
		t.Errorf("the replay from the FE's address was not refused for its proof:\n%s", tailString(string(log), 2000))
	}
	// The FE still hands off.
	if got := servedBy(t, c, "/index.html"); got != "200 be1" {
		t.Errorf("after the attempts: %q", got)
	}
}

func dumpLogs(t *testing.T, c *cluster.Cluster) {
	if !t.Failed() {
		return
	}
	for _, h := range []string{"fe", "be1", "be2"} {
		if b, err := os.ReadFile(c.AgentLog(h)); err == nil {
			t.Logf("--- %s agent log (last 3000 bytes):\n%s", h, tailString(string(b), 3000))
		}
	}
}

// A flood of connections to a BE's control port — idle ones, and ones
// claiming 8 MiB frames — costs it little memory, and the FE still hands
// off to it afterwards.
func TestControlPortFlood(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 1, Secret: "test-cluster-secret", Mallory: true, Rules: []string{`rule = be1 .*`}})
	ctlAddr := c.BEs[0].IP + ":666"
	pid := c.AgentPID("be1")
	rss0, _ := bench.RSS(pid)
	var peak atomic.Int64
	sample := func() {
		if r, err := bench.RSS(pid); err == nil && r > peak.Load() {
			peak.Store(r)
		}
	}
	// 20,000 idle connections from a stranger, 5,000 held at a time (the
	// test's own descriptors are limited too), and 5,000 from the FE's
	// address, which passes the member check but not the handshake.
	flood := func(host string, total, batch int) (opened int) {
		for done := 0; done < total; done += batch {
			var conns []net.Conn
			for range batch {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				conn, err := c.Dial(ctx, host, 0, ctlAddr)
				cancel()
				if err != nil {
					continue
				}
				conns = append(conns, conn)
			}
			opened += len(conns)
			sample()
			time.Sleep(200 * time.Millisecond)
			sample()
			for _, conn := range conns {
				conn.Close()
			}
		}
		return opened
	}
	t.Logf("stranger: %d connections opened", flood("mallory", 20000, 5000))
	t.Logf("FE address: %d connections opened", flood("fe", 5000, 5000))
	// 64 headers claiming an 8 MiB frame, from the FE's address.
	var claims []net.Conn
	for range 64 {
		conn, err := c.Dial(context.Background(), "fe", 0, ctlAddr)
		if err != nil {
			continue
		}
		h, _ := wire.AppendFrame(nil, wire.Frame{Type: wire.TypeHello, Payload: []byte{1}}, nil)
		binary.BigEndian.PutUint32(h[20:], 8<<20)
		conn.Write(h[:wire.HeaderLen])
		conn.Write(make([]byte, 4096))
		claims = append(claims, conn)
	}
	time.Sleep(300 * time.Millisecond)
	sample()
	for _, conn := range claims {
		conn.Close()
	}
	t.Logf("be1 RSS %d KiB before, peak %d KiB", rss0>>10, peak.Load()>>10)
	if peak.Load() > 64<<20 {
		t.Errorf("be1's RSS peaked at %d MiB, want under 64 MiB", peak.Load()>>20)
	}
	deadline := time.Now().Add(10 * time.Second)
	for servedBy(t, c, "/index.html") != "200 be1" {
		if time.Now().After(deadline) {
			t.Fatal("the FE does not hand off to be1 after the flood")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// A local user of the FE's host connects from the FE's address and passes
// a BE's member check; holding every handshake slot of that address while
// a BE restarts must not keep the FE's sessions out (issue 19: 16 idle
// connections to be1:666 from the FE's host, and every request for be1 got
// 503 until they stopped).
func TestStrangerOnFEHostCannotLockOutBE(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 1, Rules: []string{`rule = be1 .*`}})
	if got := servedBy(t, c, "/index.html"); got != "200 be1" {
		t.Fatalf("before: %q", got)
	}
	if err := c.StopAgent("be1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// 24 connections that send nothing, each redialed 10 ms after the BE
	// closes it (or refuses it while it is down): the slots are taken
	// again as soon as they free up, as the red team's script did.
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var opened atomic.Int64
	ctlAddr := c.BEs[0].IP + ":666"
	for range 24 {
		wg.Go(func() {
			for ctx.Err() == nil {
				dctx, cancel := context.WithTimeout(ctx, time.Second)
				conn, err := c.Dial(dctx, "fe", 0, ctlAddr)
				cancel()
				if err == nil {
					opened.Add(1)
					unblock := context.AfterFunc(ctx, func() { conn.Close() })
					io.Copy(io.Discard, conn)
					unblock()
					conn.Close()
				}
				select {
				case <-ctx.Done():
				case <-time.After(10 * time.Millisecond):
				}
			}
		})
	}
	defer func() { stop(); wg.Wait() }()
	time.Sleep(time.Second)
	if err := c.StartAgent("be1"); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	// The FE redials a BE that was down with a backoff of up to 5 s.
	for got := ""; got != "200 be1"; got = servedBy(t, c, "/index.html") {
		if time.Since(start) > 8*time.Second {
			t.Fatalf("be1 unreachable for %v after its restart (last answer %q; %d stranger connections opened)",
				time.Since(start).Round(time.Millisecond), got, opened.Load())
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("be1 served %v after its restart; %d stranger connections from the FE's host opened",
		time.Since(start).Round(time.Millisecond), opened.Load())
	if opened.Load() < 24 {
		t.Errorf("only %d stranger connections opened: the slots were not held", opened.Load())
	}
	// Each refused handshake is a WARN; the log holds the first ten of the
	// last 10 s and a count, not one line each.
	if n := strings.Count(c.Grep("be1", `msg="control session refused"`), "\n"); n > 11 {
		t.Errorf("be1 logged %d refusals for %d stranger connections, want at most 11", n, opened.Load())
	}
}

// The FE's registration port is closed unless [fe] dregister = 1 (issue 19:
// it was open whenever a secret was set, and every stranger's connection
// wrote a WARN line).
func TestRegistrationPortClosedByDefault(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 1, Rules: []string{`rule = be1 .*`}})
	regAddr := fmt.Sprintf("%s:%d", cluster.FEIP, cluster.Port)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	conn, err := c.Dial(ctx, "be1", 0, regAddr)
	if err == nil {
		conn.Close()
		t.Fatalf("%s took a connection without [fe] dregister = 1", regAddr)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("connect to %s: %v, want connection refused", regAddr, err)
	}
	if !strings.Contains(c.Grep("fe", "registration"), "BE registration off") {
		t.Errorf("the FE did not say registration is off:\n%s", c.Grep("fe", "regist"))
	}
}

// wrk at concurrency 64 with one request per connection for 20 s: every
// answer 200, no socket errors, and afterwards no connection left on any
// host once TIME_WAIT is over.
func TestChurn(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "timewait = 2\n"})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := c.Output(ctx, "client", "wrk", "-t2", "-c64", "-d20s", "-H", "Connection: close", url+"/index.html")
	if err != nil {
		t.Fatal(err)
	}
	w, err := bench.ParseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d requests, %.0f/s, %d non-2xx, %d socket errors", w.Requests, w.RPS, w.Non2xx, w.SocketErrors)
	if w.Non2xx != 0 || w.SocketErrors != 0 {
		t.Errorf("wrk:\n%s", out)
	}
	deadline := time.Now().Add(2*time.Second + 5*time.Second)
	for {
		table, kernel := flowsOf(t, c)
		relaying := statusOf(t, c, "be1", "relaying") + statusOf(t, c, "be2", "relaying")
		pending := statusOf(t, c, "be1", "pending") + statusOf(t, c, "be2", "pending")
		if len(table) == 0 && len(kernel) == 0 && relaying == 0 && pending == 0 {
			break
		}
		if time.Now().After(deadline) {
			for flow, state := range table {
				t.Logf("left: %s %s; its log lines:\n%s", flow, state, c.Grep("fe", flow)+c.Grep("be1", flow)+c.Grep("be2", flow))
			}
			t.Fatalf("after the run: %d rows, %d forwarded flows, %d relays, %d pending handoffs left",
				len(table), len(kernel), relaying, pending)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// 1,000 connections sending their heads a byte at a time from another
// address delay a legitimate request by less than 100 ms.
func TestSlowloris(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 1, Secret: "test-cluster-secret", Mallory: true, Rules: []string{`rule = be1 .*`}})
	ttfb := func() time.Duration {
		var samples []time.Duration
		for range 15 {
			out := curl(t, c, "-o", "/dev/null", "-w", "%{time_starttransfer}", url+"/index.html")
			f, _ := strconv.ParseFloat(out, 64)
			samples = append(samples, time.Duration(f*1e9))
		}
		sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
		return samples[len(samples)/2]
	}
	before := ttfb()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var open atomic.Int64
	for range 1000 {
		wg.Go(func() {
			conn, err := c.Dial(context.Background(), "mallory", 0, fmt.Sprintf("%s:%d", cluster.VIP, cluster.Port))
			if err != nil {
				return
			}
			defer conn.Close()
			open.Add(1)
			head := "GET / HTTP/1.1\r\nX-Slow: " + strings.Repeat("a", 1000)
			for i := 0; ; i++ {
				if _, err := conn.Write([]byte{head[i%len(head)]}); err != nil {
					return
				}
				select {
				case <-stop:
					return
				case <-time.After(500 * time.Millisecond):
				}
			}
		})
	}
	time.Sleep(2 * time.Second)
	during := ttfb()
	close(stop)
	wg.Wait()
	t.Logf("%d slow connections opened; TTFB median %v before, %v during; FE refused_busy=%d",
		open.Load(), before, during, statusOf(t, c, "fe", "refused_busy"))
	if during-before > 100*time.Millisecond {
		t.Errorf("slowloris added %v to a legitimate request's time to first byte", during-before)
	}
}

// 10,000 idle handed-off keep-alive connections, then a request on each:
// all answered 200 (maxclients bounds work in progress, not idle
// connections).
func TestTenThousandIdleKeepAlive(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 1, Secret: "test-cluster-secret", Rules: []string{`rule = be1 .*`}})
	const n = 10000
	type kc struct {
		conn net.Conn
		br   *bufio.Reader
	}
	conns := make([]*kc, n)
	get := func(k *kc) error {
		k.conn.SetDeadline(time.Now().Add(30 * time.Second))
		fmt.Fprintf(k.conn, "GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(k.br, nil)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	}
	var failed atomic.Int64
	var firstErr atomic.Value
	run := func(fn func(i int) error) {
		sem := make(chan struct{}, 64)
		var wg sync.WaitGroup
		for i := range n {
			sem <- struct{}{}
			wg.Go(func() {
				defer func() { <-sem }()
				if err := fn(i); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Errorf("connection %d: %w", i, err))
				}
			})
		}
		wg.Wait()
	}
	run(func(i int) error {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		conn, err := c.Dial(ctx, "client", 0, fmt.Sprintf("%s:%d", cluster.VIP, cluster.Port))
		if err != nil {
			return err
		}
		conns[i] = &kc{conn, bufio.NewReader(conn)}
		return get(conns[i])
	})
	defer func() {
		for _, k := range conns {
			if k != nil {
				k.conn.Close()
			}
		}
	}()
	if failed.Load() != 0 {
		t.Fatalf("%d of %d first requests failed; first: %v", failed.Load(), n, firstErr.Load())
	}
	rss, _ := bench.RSS(c.AgentPID("be1"))
	t.Logf("%d idle handed-off connections; be1 RSS %d MiB, relaying %d", n, rss>>20, statusOf(t, c, "be1", "relaying"))
	run(func(i int) error { return get(conns[i]) })
	if failed.Load() != 0 {
		t.Fatalf("%d of %d second requests failed; first: %v", failed.Load(), n, firstErr.Load())
	}
}
