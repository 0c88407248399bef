package tests

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// Issue 18 item 1: health that means something. With [fe] check and
// checkexpect = 200-399, a BE whose web server answers the check with 500
// goes NOTAVAILABLE (its requests fall through to the next rule), and
// comes back when the check answers 200 again. Before, any HTTP answer to
// HEAD / counted as up. The checks never reach nginx's access log, kept
// out by the README's map.
func TestHealthCheckExpect(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret",
		Rules:   []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "dtcinterval = 1\nfall = 2\nrise = 2\ncheck = GET /health host=localhost\ncheckexpect = 200-399\n"})
	be2 := c.BEs[1].IP
	waitBackend(t, c, be2, 5*time.Second, "AVAILABLE", func(b *beStatus) bool { return b != nil && b.Available })
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be2" {
		t.Fatalf("before: %q", got)
	}
	sick := filepath.Join(c.WWW("be2"), "sick")
	if err := os.WriteFile(sick, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// be2's nginx still serves every file: only the check says 500.
	took := waitBackend(t, c, be2, 1*2*time.Second+3*time.Second, "NOTAVAILABLE", func(b *beStatus) bool { return b != nil && !b.Available })
	t.Logf("be2 NOTAVAILABLE %v after its check began answering 500", took.Round(time.Millisecond))
	if row := backendsOf(t, c)[be2]; !strings.Contains(row.LastError, "fails the check GET /health host=localhost expect=200-399") {
		t.Errorf("be2's last probe error %q does not say why", row.LastError)
	}
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be1" {
		t.Errorf(".jpg with be2 NOTAVAILABLE: %q, want the fallback rule's be1", got)
	}
	if err := os.Remove(sick); err != nil {
		t.Fatal(err)
	}
	took = waitBackend(t, c, be2, 1*2*time.Second+3*time.Second, "AVAILABLE", func(b *beStatus) bool { return b != nil && b.Available })
	t.Logf("be2 AVAILABLE %v after its check answered 200 again", took.Round(time.Millisecond))
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be2" {
		t.Errorf(".jpg after be2 recovered: %q", got)
	}
	// Seconds of checks, none in the access log; the client's request is.
	log, err := os.ReadFile(filepath.Join(c.Dir, "be2", "access.log"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(log), "tcpha-check") || strings.Contains(string(log), "/health") {
		t.Errorf("be2's access log holds the checks:\n%s", log)
	}
	if !strings.Contains(string(log), "/img/a.jpg") {
		t.Errorf("be2's access log lacks the client's request:\n%s", log)
	}
}

// A BE's own [be] checkexpect overrides the FE's: be1 accepting only 500
// from its check is NOTAVAILABLE while its web server answers 200.
func TestHealthCheckBEOverride(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 1, Secret: "test-cluster-secret",
		Rules:   []string{`rule = be1 .*`},
		FEExtra: "dtcinterval = 1\nfall = 1\nrise = 1\ncheck = GET /health\n",
		BEExtra: "checkexpect = 500\n"})
	be1 := c.BEs[0].IP
	waitBackend(t, c, be1, 5*time.Second, "NOTAVAILABLE", func(b *beStatus) bool { return b != nil && !b.Available })
	if err := os.WriteFile(filepath.Join(c.WWW("be1"), "sick"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	waitBackend(t, c, be1, 5*time.Second, "AVAILABLE", func(b *beStatus) bool { return b != nil && b.Available })
}

// The README's way of keeping the checks out of nginx's access log is the
// one the namespace cluster's nginx runs (TestHealthCheckExpect).
func TestReadmeCheckLogMap(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	norm := func(s string) string { return regexp.MustCompile(`\s+`).ReplaceAllString(strings.TrimSpace(s), " ") }
	if !strings.Contains(norm(string(b)), norm(cluster.CheckLogMap)) {
		t.Errorf("README.md does not show the cluster's map:\n%s", cluster.CheckLogMap)
	}
	if !strings.Contains(string(b), "if=$tcpha_loggable;") {
		t.Error("README.md does not use $tcpha_loggable in access_log")
	}
}
