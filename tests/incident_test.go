package tests

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// Issue 18 item 2: what an operator reaches for in an incident, on a
// namespace cluster.

// rateRow is one row of `tcphactl -o json rates`.
type rateRow struct {
	Addr  string `json:"addr"`
	Total struct {
		Conns    int64 `json:"connections"`
		Requests int64 `json:"requests"`
	} `json:"total"`
	Rate, Peak struct {
		Conns    float64 `json:"connections"`
		Requests float64 `json:"requests"`
		BytesIn  float64 `json:"bytes_in"`
		BytesOut float64 `json:"bytes_out"`
	}
}

// Rates are non-zero after traffic, from the FE's handoffs and the BE's
// relay counters, which the BE exports on /metrics (without the FE's
// histogram) and the FE per BE; rules count their hits; status names the
// version and uptime; clear counters zeroes the hits.
func TestIncidentRates(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Metrics: true,
		Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}})
	be1 := c.BEs[0].IP
	os.WriteFile(filepath.Join(c.WWW("be1"), "mb.bin"), make([]byte, 1<<20), 0o644)
	for range 10 {
		servedBy(t, c, "/index.html")
	}
	servedBy(t, c, "/img/a.jpg")
	if got := servedBy(t, c, "/mb.bin"); got != "200 be1" {
		t.Fatalf("/mb.bin: %q", got)
	}
	time.Sleep(1500 * time.Millisecond) // a sample or two of the counters
	var rows []rateRow
	out := ctl(t, c, "fe", "-o", "json", "rates")
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("rates: %v: %s", err, out)
	}
	var r *rateRow
	for i := range rows {
		if rows[i].Addr == be1 {
			r = &rows[i]
		}
	}
	if r == nil || r.Rate.Conns <= 0 || r.Rate.Requests <= 0 || r.Rate.BytesIn <= 0 || r.Rate.BytesOut < 1<<20/5 ||
		r.Peak.BytesOut < r.Rate.BytesOut || r.Total.Conns != 11 || r.Total.Requests != 11 {
		t.Errorf("be1's rates after 11 requests and 1 MB:\n%s", out)
	}
	t.Logf("tcphactl rates:\n%s", ctl(t, c, "fe", "rates"))

	get := func(host string) string {
		t.Helper()
		out, err := c.Output(context.Background(), host, "curl", "-sS", "http://"+cluster.MetricsAddr+"/metrics")
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	fe, b1 := get("fe"), get("be1")
	for name, least := range map[string]float64{
		`tcpha_backend_requests_total{backend="` + be1 + `"}`:              11,
		`tcpha_backend_bytes_total{backend="` + be1 + `",direction="out"}`: 1 << 20,
		`tcpha_backend_bytes_total{backend="` + be1 + `",direction="in"}`:  11 * 30,
	} {
		if v := metricSum(fe, name); v < least {
			t.Errorf("FE: %s = %v, want at least %v", name, v, least)
		}
	}
	for name, least := range map[string]float64{
		`tcpha_relay_requests_total`:                  11,
		`tcpha_relay_bytes_total{direction="out"}`:    1 << 20,
		`tcpha_relay_bytes_total{direction="in"}`:     11 * 30,
		`tcpha_relay_upstream_errors_total`:           0,
		`tcpha_relay_moves_total{result="moved"}`:     0,
		`tcpha_relay_moves_total{result="not_moved"}`: 0,
		`tcpha_relay_connections`:                     0,
	} {
		if v := metricSum(b1, name); v < least {
			t.Errorf("be1: %s = %v, want at least %v", name, v, least)
		}
	}
	if strings.Contains(b1, "tcpha_handoff_duration_seconds") {
		t.Error("be1 exports the FE's handoff histogram")
	}
	if !strings.Contains(fe, "tcpha_handoff_duration_seconds_count") {
		t.Error("the FE lost its handoff histogram")
	}

	rules := ctl(t, c, "fe", "rules")
	if !strings.Contains(rules, `\.jpg$`) || !strings.Contains(rules, "hits") {
		t.Errorf("rules:\n%s", rules)
	}
	var rs []struct {
		Targets string `json:"targets"`
		Hits    int64  `json:"hits"`
	}
	json.Unmarshal([]byte(ctl(t, c, "fe", "-o", "json", "rules")), &rs)
	if len(rs) != 2 || rs[0].Targets != c.BEs[1].IP || rs[0].Hits != 1 || rs[1].Hits != 11 {
		t.Errorf("rules JSON: %+v", rs)
	}
	var st struct {
		Version string  `json:"version"`
		Uptime  float64 `json:"uptime_seconds"`
	}
	if err := json.Unmarshal([]byte(ctl(t, c, "fe", "-o", "json", "status")), &st); err != nil || st.Version == "" || st.Uptime < 1 {
		t.Errorf("status: version %q uptime %v: %v", st.Version, st.Uptime, err)
	}
	if text := ctl(t, c, "be1", "status"); !strings.HasPrefix(text, "tcpha-agent ") || !strings.Contains(text, " up ") {
		t.Errorf("status on a BE:\n%s", text)
	}
	ctl(t, c, "fe", "clear", "counters")
	json.Unmarshal([]byte(ctl(t, c, "fe", "-o", "json", "rules")), &rs)
	if rs[0].Hits != 0 || rs[1].Hits != 0 || backendsOf(t, c)[be1].Handoffs != 0 {
		t.Errorf("after clear counters: rules %+v, backends %+v", rs, backendsOf(t, c)[be1])
	}
	if out, err := ctlRun(c, "fe", "clear", "all"); err == nil {
		t.Errorf("clear all accepted: %s", out)
	}
}

// maint forces a BE down: no new connections (its rules fall through),
// the download it serves finishes, probes do not bring it back; ready
// does. backends shows MAINT, the last change and the downtime.
func TestMaintReady(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret",
		Rules: []string{`rule = be2 \.jpg$|\.bin$`, `rule = be1 .*`}, FEExtra: "dtcinterval = 500ms\n"})
	be2 := c.BEs[1].IP
	os.WriteFile(filepath.Join(c.WWW("be2"), "big.bin"), make([]byte, 12<<20), 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dl := c.Exec(ctx, "client", "curl", "-sS", "--limit-rate", "3M", "-o", "/dev/null", "-w", "%{size_download}", url+"/big.bin")
	var dlOut strings.Builder
	dl.Stdout, dl.Stderr = &dlOut, &dlOut
	if err := dl.Start(); err != nil {
		t.Fatal(err)
	}
	waitBackend(t, c, be2, 5*time.Second, "serving the download", func(b *beStatus) bool { return b != nil && b.Live > 0 })
	before := time.Now()
	ctl(t, c, "fe", "maint", be2)
	time.Sleep(1200 * time.Millisecond) // probes, all good
	row := backendsOf(t, c)[be2]
	if row.Available {
		t.Errorf("be2 in maint is available: %+v", row)
	}
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be1" {
		t.Errorf(".jpg with be2 in maint: %q, want be1", got)
	}
	text := ctl(t, c, "fe", "backends")
	if !strings.Contains(text, "NOTAVAILABLE,MAINT") {
		t.Errorf("backends:\n%s", text)
	}
	var rows []struct {
		Addr       string    `json:"addr"`
		Maint      bool      `json:"maint"`
		LastChange time.Time `json:"last_change"`
		Downtime   float64   `json:"downtime_seconds"`
	}
	json.Unmarshal([]byte(ctl(t, c, "fe", "-o", "json", "backends")), &rows)
	for _, r := range rows {
		if r.Addr == be2 && (!r.Maint || r.LastChange.Before(before.Add(-time.Second)) || r.Downtime < 1) {
			t.Errorf("be2's row: %+v", r)
		}
	}
	if err := dl.Wait(); err != nil || dlOut.String() != "12582912" {
		t.Errorf("the download across maint: %v, %q bytes", err, dlOut.String())
	}
	ctl(t, c, "fe", "ready", be2)
	waitBackend(t, c, be2, 3*time.Second, "AVAILABLE", func(b *beStatus) bool { return b != nil && b.Available })
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be2" {
		t.Errorf(".jpg after ready: %q", got)
	}
}

// kill resets a BE's connections: a client in the middle of a slow
// download sees a reset at once instead of hanging, the FE's table and
// forwarding forget it, and new connections are served.
func TestKill(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Rules: []string{`rule = be1 .*`}})
	be1 := c.BEs[0].IP
	// More than the sockets' buffers hold, so that the download is cut
	// (curl reads what its buffers hold before it sees the reset).
	f, err := os.Create(filepath.Join(c.WWW("be1"), "big.bin"))
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(100 << 20)
	f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dl := c.Exec(ctx, "client", "curl", "-sS", "--limit-rate", "1M", "-o", "/dev/null", url+"/big.bin")
	var dlErr strings.Builder
	dl.Stderr = &dlErr
	if err := dl.Start(); err != nil {
		t.Fatal(err)
	}
	waitBackend(t, c, be1, 5*time.Second, "serving the download", func(b *beStatus) bool { return b != nil && b.Live > 0 })
	time.Sleep(300 * time.Millisecond)
	var conns []struct {
		ClientPort int `json:"client_port"`
	}
	json.Unmarshal([]byte(ctl(t, c, "fe", "-o", "json", "conns", "be="+be1, "state=HANDOFFED")), &conns)
	if len(conns) != 1 {
		t.Fatalf("conns be=%s state=HANDOFFED: %+v", be1, conns)
	}
	start := time.Now()
	out := ctl(t, c, "fe", "kill", be1)
	// The client's socket is reset at once: nothing established to the
	// VIP is left, and curl fails with a reset, not a timeout.
	time.Sleep(200 * time.Millisecond)
	if ss, _ := c.Output(context.Background(), "client", "ss", "-tn", "state", "established"); strings.Contains(ss, cluster.VIP) {
		t.Errorf("the download's connection is still established after kill:\n%s", ss)
	}
	// The BE let go of it too: its relay no longer serves it (without the
	// BE's reset only the FE would forget it, and the relay would go on
	// writing to a client that is gone).
	for deadline := time.Now().Add(time.Second); ; time.Sleep(50 * time.Millisecond) {
		if out := ctl(t, c, "be1", "-o", "json", "conns"); strings.TrimSpace(out) == "[]" {
			break
		} else if time.Now().After(deadline) {
			t.Errorf("be1 still relays the killed connection:\n%s", out)
			break
		}
	}
	err = dl.Wait()
	took := time.Since(start)
	t.Logf("tcphactl kill: %s; curl ended %v later: %v %s", strings.TrimSpace(out), took.Round(time.Millisecond), err, strings.TrimSpace(dlErr.String()))
	if !strings.Contains(out, "1 connections reset") {
		t.Errorf("kill answered %q", out)
	}
	if err == nil || !strings.Contains(strings.ToLower(dlErr.String()), "reset") {
		t.Errorf("the download after kill: %v after %v: %s", err, took, dlErr.String())
	}
	json.Unmarshal([]byte(ctl(t, c, "fe", "-o", "json", "conns", "be="+be1, "state=HANDOFFED")), &conns)
	if len(conns) != 0 {
		t.Errorf("conns after kill: %+v", conns)
	}
	if got := servedBy(t, c, "/index.html"); got != "200 be1" {
		t.Errorf("a new connection after kill: %q", got)
	}
	// Refusals exit 1 and say why.
	for _, args := range [][]string{{"kill", "10.77.0.99"}, {"kill", "nope"}, {"maint", "10.77.0.99"}, {"conns", "be=nope"},
		{"conns", "port=80"}, {"clear"}, {"ready"}} {
		out, err := ctlRun(c, "fe", args...)
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(out, "tcphactl: ") {
			t.Errorf("tcphactl %q: %v %q, want exit 1 and the reason", args, err, out)
		}
	}
}
