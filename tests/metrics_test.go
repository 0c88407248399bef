package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// rawStatus sends raw bytes to the VIP from the client and returns the
// status line of the answer.
func rawStatus(t *testing.T, c *cluster.Cluster, raw string, wait time.Duration) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := c.Dial(ctx, "client", 0, net.JoinHostPort(cluster.VIP, "80"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte(raw)); err != nil {
		t.Fatalf("write %.20q: %v", raw, err)
	}
	time.Sleep(wait)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatalf("answer to %.20q: %v", raw, err)
	}
	return strings.TrimSpace(line)
}

// scrapeMetrics returns host's /metrics after checking it with promtool.
func scrapeMetrics(t *testing.T, c *cluster.Cluster, host string) string {
	t.Helper()
	out, err := c.Output(context.Background(), host, "curl", "-sS", "http://"+cluster.MetricsAddr+"/metrics")
	if err != nil {
		t.Fatalf("%s /metrics: %v", host, err)
	}
	cmd := exec.Command("promtool", "check", "metrics")
	cmd.Stdin = strings.NewReader(out)
	if lint, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics on %s's /metrics: %v\n%s", host, err, lint)
	}
	return out
}

// The FE's and a BE's /metrics after traffic pass `promtool check
// metrics` (Debian's prometheus package), and hold what issue 18 asked
// for: the FE's 400, 408 and 431 answers, tcpha_build_info, the reloads
// with their result and time, and tcpha_nfqueue_packets_total counting
// each queued packet once (its series once added up to about twice the
// packets `tcphactl status` reported queued).
func TestMetricsPromtool(t *testing.T) {
	if _, err := exec.LookPath("promtool"); err != nil {
		t.Fatal("promtool is needed (Debian: prometheus; make deps):", err)
	}
	c := newCluster(t, cluster.Options{BEs: 2, Metrics: true, Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "requesttimeout = 500ms\nmaxheader = 1024\n"})
	for range 10 {
		servedBy(t, c, "/index.html")
	}
	for range 5 {
		servedBy(t, c, "/img/a.jpg")
	}
	for _, tc := range []struct {
		raw  string
		wait time.Duration
		want string
	}{
		{"\x16\x03\x01garbage\r\n\r\n", 0, "HTTP/1.1 400 "},
		{"GET / HTTP/1.1\r\nX-Big: " + strings.Repeat("a", 2000) + "\r\n\r\n", 0, "HTTP/1.1 431 "},
		{"GET / HTTP/1.1\r\nHost: x\r\n", 700 * time.Millisecond, "HTTP/1.1 408 "},
	} {
		if got := rawStatus(t, c, tc.raw, tc.wait); !strings.HasPrefix(got, tc.want) {
			t.Errorf("%.20q: %q, want %q", tc.raw, got, tc.want)
		}
	}
	// One reload refused, then one that loads.
	conf := c.ConfigFile("fe")
	good, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(conf, append(append([]byte{}, good...), "\n[fe]\nbogus = 1\n"...), 0o640)
	if out, err := ctlRun(c, "fe", "reload"); err == nil {
		t.Errorf("tcphactl reload of a broken file succeeded: %s", out)
	}
	os.WriteFile(conf, good, 0o640)
	ctl(t, c, "fe", "reload")
	time.Sleep(2500 * time.Millisecond) // the FINs seen

	fe := scrapeMetrics(t, c, "fe")
	be := scrapeMetrics(t, c, "be1")
	for sample, want := range map[string]float64{
		`tcpha_handoffs_total{result="ok"}`:                  15,
		`tcpha_handoffs_total{result="400"}`:                 1,
		`tcpha_handoffs_total{result="408"}`:                 1,
		`tcpha_handoffs_total{result="431"}`:                 1,
		`tcpha_config_reloads_total{result="ok"}`:            1,
		`tcpha_config_reloads_total{result="refused"}`:       1,
		`tcpha_config_last_reload_successful`:                1,
		`tcpha_build_info{goversion="go`:                     1,
		`tcpha_nfqueue_packets_total{event="fin",reason="fo`: 15,
	} {
		if got := metricSum(fe, sample); got != want {
			t.Errorf("FE: %s = %v, want %v", sample, got, want)
		}
	}
	if got := metricSum(fe, `tcpha_config_last_reload_timestamp_seconds`); got < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("FE: tcpha_config_last_reload_timestamp_seconds = %v, not the reload's time", got)
	}
	if got := metricSum(be, `tcpha_build_info{goversion="go`); got != 1 {
		t.Errorf("BE: tcpha_build_info = %v, want 1", got)
	}
	var st struct {
		FE struct {
			Queued int64 `json:"queued"`
		} `json:"fe"`
	}
	if err := json.Unmarshal([]byte(ctl(t, c, "fe", "-o", "json", "status")), &st); err != nil {
		t.Fatal(err)
	}
	if got := metricSum(fe, "tcpha_nfqueue_packets_total{"); st.FE.Queued < 15 || got != float64(st.FE.Queued) {
		t.Errorf("tcpha_nfqueue_packets_total adds up to %v, want the %d packets tcphactl status says were queued", got, st.FE.Queued)
	}
	if t.Failed() {
		t.Logf("FE /metrics:\n%s", fe)
	}
}
