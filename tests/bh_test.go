package tests

import (
	"context"
	"crypto/md5"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// bhCluster is one BE with deliver = socket under an FE with phttp =
// multi whose rules name only that BE: connections are delivered, and
// their later requests are read from the BE's packet path (issue 15 item
// 2).
func bhCluster(t *testing.T) *cluster.Cluster {
	t.Helper()
	c := newCluster(t, cluster.Options{BEs: 1, Secret: "test-cluster-secret", Rules: []string{`rule = be1 .*`},
		FEExtra: "phttp = multi\n", BEExtra: "deliver = socket\n", Metrics: true})
	deadline := time.Now().Add(10 * time.Second)
	for c.Grep("be1", `msg="cluster rules from the FE"`) == "" || !strings.Contains(mustAdmin(t, c, "be1", "status"), "deliver=socket") {
		if time.Now().After(deadline) {
			t.Fatal("be1 got no cluster frame, or has no deliver line")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return c
}

// deliveredKeepAlive dials a keep-alive connection and sends its first
// request, until be1 delivered one (a connection may be relayed for a
// transplant's reason of its own on a busy machine, not_accepted: never
// for the packet path's, which fails the test), up to 3 tries.
func deliveredKeepAlive(t *testing.T, c *cluster.Cluster) *keepAlive {
	t.Helper()
	for try := 1; ; try++ {
		d0, _ := deliveries(t, c)
		k := dialKeepAlive(t, c)
		if got := kget(t, k, "/index.html"); got != "200 be1" {
			t.Fatalf("first request: %q", got)
		}
		line := deliverLine(t, c)
		for _, bad := range []string{"relayed_packet-path=", "relayed_pipelined=", "relayed_phttp="} {
			if strings.Contains(line, bad) {
				t.Fatalf("relayed for the packet path: %s", line)
			}
		}
		if d, _ := deliveries(t, c); d > d0 {
			return k
		}
		k.conn.Close()
		if try == 3 {
			t.Fatalf("no connection delivered in %d tries: %s", try, line)
		}
		t.Logf("try %d relayed: %s", try, line)
	}
}

// bhPackets reads be1's tcpha_be_nfqueue_packets_total by reason.
func bhPackets(t *testing.T, c *cluster.Cluster) map[string]int {
	t.Helper()
	out := scrapeMetrics(t, c, "be1")
	m := map[string]int{}
	for _, l := range regexp.MustCompile(`(?m)^tcpha_be_nfqueue_packets_total\{reason="([^"]+)"\} (\d+)$`).FindAllStringSubmatch(out, -1) {
		m[l[1]], _ = strconv.Atoi(l[2])
	}
	return m
}

// A delivered keep-alive connection's later requests go through the BE's
// packet path: each is judged this BE's and served by nginx; a 20 MB
// download's ACKs stay in the kernel; `tcphactl conns` on the BE shows the
// connection ESTABLISHED, then TIME_WAIT after the client's FIN; killing
// the BE agent leaves nginx serving it (the queue is bypassed).
func TestDeliverSocketLaterRequests(t *testing.T) {
	c := bhCluster(t)
	k := deliveredKeepAlive(t, c)
	defer k.conn.Close()
	for i, p := range []string{"/img/a.jpg", "/index.html", "/img/a.jpg"} {
		if got := kget(t, k, p); got != "200 be1" {
			t.Fatalf("later request %d (%s): %q", i, p, got)
		}
	}
	pk := bhPackets(t, c)
	if pk["here"] != 3 {
		t.Errorf("packets judged %v: want the 3 later requests judged this BE's (here)", pk)
	}
	_, port, _ := strings.Cut(k.local(), ":")
	row := func() string {
		for _, l := range strings.Split(mustAdmin(t, c, "be1", "conns"), "\n") {
			if strings.Contains(l, ":"+port+" ") {
				return l
			}
		}
		return ""
	}
	if r := row(); !strings.Contains(r, "ESTABLISHED delivered") || !strings.Contains(r, " 3 ") {
		t.Errorf("tcphactl conns on be1 for %s: %q, want ESTABLISHED delivered with 3 requests:\n%s", k.local(), r, mustAdmin(t, c, "be1", "conns"))
	}

	// Pipelined: two requests in one segment, both this BE's.
	k.conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := k.conn.Write([]byte("GET /index.html HTTP/1.1\r\nHost: tcpha\r\n\r\nGET /img/a.jpg HTTP/1.1\r\nHost: tcpha\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if got, err := readAnswer(k); err != nil || got != "200 be1" {
			t.Errorf("pipelined answer %d: %q %v", i, got, err)
		}
	}
	// A head split over two segments: the first waits for the client's
	// retransmission (dropped until the head is whole), then nginx
	// answers.
	start := time.Now()
	if _, err := k.conn.Write([]byte("GET /index.html HT")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if _, err := k.conn.Write([]byte("TP/1.1\r\nHost: tcpha\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	if got, err := readAnswer(k); err != nil || got != "200 be1" {
		t.Errorf("a head split over segments: %q %v", got, err)
	}
	t.Logf("a head split over two segments answered in %v", time.Since(start).Round(time.Millisecond))
	if pk := bhPackets(t, c); pk["here"] < 4 || pk["head-split"] < 1 {
		t.Errorf("packets %v: want the pipeline judged here and a split head dropped", pk)
	}

	// A 20 MB body: the client's ACKs are not queued.
	pk = bhPackets(t, c)
	big := make([]byte, 20<<20)
	rand.Read(big)
	if err := os.WriteFile(filepath.Join(c.WWW("be1"), "big.bin"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	status, sum, err := k.getBody("/big.bin")
	if err != nil || status != "200 be1" {
		t.Fatalf("20 MB on the delivered connection: %q %v", status, err)
	}
	if want := md5.Sum(big); sum != want {
		t.Errorf("20 MB body: md5 %x, want %x", sum, want)
	}
	before := 0
	for _, n := range pk {
		before += n
	}
	total := 0
	for _, n := range bhPackets(t, c) {
		total += n
	}
	if total-before > 5 {
		t.Errorf("%d packets queued for one request and its 20 MB answer: ACKs were queued (%v)", total-before, bhPackets(t, c))
	}

	// Kill the agent: nginx keeps serving the connection.
	if err := c.StopAgent("be1", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if got := kget(t, k, "/index.html"); got != "200 be1" {
			t.Errorf("request %d after the BE agent was killed: %q", i, got)
		}
	}
}

// FIN feeds TIME_WAIT, and the row goes when it ends.
func TestDeliverSocketTimeWait(t *testing.T) {
	c := bhCluster(t)
	k := deliveredKeepAlive(t, c)
	if got := kget(t, k, "/index.html"); got != "200 be1" {
		t.Fatalf("second request: %q", got)
	}
	_, port, _ := strings.Cut(k.local(), ":")
	k.conn.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		conns := mustAdmin(t, c, "be1", "conns")
		if regexp.MustCompile(`:` + port + `\s+TIME_WAIT`).MatchString(conns) {
			break
		}
		if time.Now().After(deadline) {
			table, _ := c.Output(context.Background(), "be1", "nft", "list", "table", "ip", "tcpha")
			t.Fatalf("no TIME_WAIT row for port %s after the client's FIN:\n%s\n%s", port, conns, table)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if pk := bhPackets(t, c); pk["close"] < 1 {
		t.Errorf("packets %v: no FIN judged", pk)
	}
	// The element leaves @delivered with the row (TIME_WAIT 10 s).
	deadline = time.Now().Add(15 * time.Second)
	for {
		set, err := c.Output(context.Background(), "be1", "nft", "list", "set", "ip", "tcpha", "delivered")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(set, " . "+port) && !strings.Contains(mustAdmin(t, c, "be1", "conns"), ":"+port+" ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("port %s still followed after TIME_WAIT:\n%s", port, set)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// readAnswer reads one response on k and returns its status and server.
func readAnswer(k *keepAlive) (string, error) {
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d %s", resp.StatusCode, resp.Header.Get("X-Served-By")), nil
}

// After `nft flush ruleset` on the BE the delivered table comes back, and
// the next connection's later requests are followed again (without it,
// every connection fell back to the relay, reason packet-path).
func TestDeliverSocketFlushRuleset(t *testing.T) {
	c := bhCluster(t)
	if _, err := c.Output(context.Background(), "be1", "nft", "flush", "ruleset"); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := c.Output(context.Background(), "be1", "nft", "list", "chain", "ip", "tcpha", "delivered")
		if strings.Contains(out, "queue") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the delivered table did not come back:\n%s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// A connection may still be relayed for a reason of its own (nginx
	// slow to accept on a busy machine: not_accepted); never for the
	// packet path's.
	for try := 1; ; try++ {
		here := bhPackets(t, c)["here"]
		d0, _ := deliveries(t, c)
		k := dialKeepAlive(t, c)
		for i := range 3 {
			if got := kget(t, k, "/index.html"); got != "200 be1" {
				t.Fatalf("request %d: %q", i, got)
			}
		}
		k.conn.Close()
		if line := deliverLine(t, c); strings.Contains(line, "relayed_packet-path=") {
			t.Fatalf("connections relayed for the packet path after the flush:\n%s", line)
		}
		if d, _ := deliveries(t, c); d == d0 {
			if try < 3 {
				t.Logf("try %d relayed: %s", try, deliverLine(t, c))
				continue
			}
			t.Fatalf("no connection delivered after the flush in %d tries:\n%s", try, deliverLine(t, c))
		}
		if got := bhPackets(t, c)["here"] - here; got != 2 {
			t.Errorf("%d later requests judged after the flush, want 2", got)
		}
		return
	}
}

// Keep-alive across BEs with deliver = socket: a later request for the
// other BE moves the delivered connection there (taken from nginx without
// a packet, with the request's bytes), where it is delivered to that BE's
// nginx: be1, be2, be1, be2 on one connection, no RST.
func TestDeliverSocketMoves(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", PublicWWW: true,
		Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}, FEExtra: "phttp = multi\n", BEExtra: "deliver = socket\n", Metrics: true})
	deadline := time.Now().Add(10 * time.Second)
	for c.Grep("be1", `msg="cluster rules from the FE"`) == "" || c.Grep("be2", `msg="cluster rules from the FE"`) == "" ||
		c.Grep("be1", "later requests read from NFQUEUE") == "" || c.Grep("be2", "later requests read from NFQUEUE") == "" {
		if time.Now().After(deadline) {
			t.Fatal("the BEs got no cluster frame, or no queue")
		}
		time.Sleep(50 * time.Millisecond)
	}
	cp := startCapture(t, c, "client", "tcp[tcpflags] & tcp-rst != 0")
	k := dialKeepAlive(t, c)
	var got []string
	for _, p := range []string{"/index.html", "/img/a.jpg", "/index.html", "/img/a.jpg"} {
		s, err := k.get(p)
		if err != nil {
			t.Fatalf("GET %s after %v: %v\nbe1 log:\n%s", p, got, err, c.Grep("be1", "op=migrate"))
		}
		got = append(got, s)
	}
	// be1 moved the connection away a moment ago: HANDOFFED there (for
	// 2 s), ESTABLISHED delivered on be2.
	_, port, _ := strings.Cut(k.local(), ":")
	rowOf := func(host string) string {
		for _, l := range strings.Split(mustAdmin(t, c, host, "conns"), "\n") {
			if strings.Contains(l, ":"+port+" ") {
				return l
			}
		}
		return ""
	}
	if r1, r2 := rowOf("be1"), rowOf("be2"); !strings.Contains(r1, "HANDOFFED") || !strings.Contains(r2, "ESTABLISHED delivered") {
		t.Errorf("tcphactl conns rows for the connection: be1 %q (want HANDOFFED), be2 %q (want ESTABLISHED delivered)", r1, r2)
	}
	k.conn.Close()
	if want := []string{"200 be1", "200 be2", "200 be1", "200 be2"}; !slices.Equal(got, want) {
		t.Errorf("served by %v, want %v", got, want)
	}
	if rsts := cp.stop(t); rsts != 0 {
		t.Errorf("%d RSTs", rsts)
	}
	d1, r1 := statusOf(t, c, "be1", "delivered"), statusOf(t, c, "be1", "relayed")
	d2, r2 := statusOf(t, c, "be2", "delivered"), statusOf(t, c, "be2", "relayed")
	m1, m2 := statusOf(t, c, "be1", "moved"), statusOf(t, c, "be2", "moved")
	t.Logf("be1 delivered=%d relayed=%d moved=%d; be2 delivered=%d relayed=%d moved=%d", d1, r1, m1, d2, r2, m2)
	// A hop may be relayed for a transplant's reason of its own on a busy
	// machine (not_accepted), never for the packet path's; the moves
	// happen either way.
	for _, h := range []string{"be1", "be2"} {
		line := mustAdmin(t, c, h, "status")
		for _, bad := range []string{"relayed_packet-path=", "relayed_pipelined=", "relayed_phttp="} {
			if strings.Contains(line, bad) {
				t.Errorf("%s relayed for the packet path:\n%s", h, line)
			}
		}
	}
	if d1 < 1 || d2 < 1 || d1+d2+r1+r2 != 4 || m1 != 2 || m2 != 1 {
		t.Errorf("be1 delivered=%d relayed=%d moved=%d; be2 delivered=%d relayed=%d moved=%d: want every hop delivered and moved",
			d1, r1, m1, d2, r2, m2)
	}
}
