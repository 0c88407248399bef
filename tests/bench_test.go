package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"tcpha/internal/privtest"
)

// The bench harness runs start to finish in its smoke mode and reports
// every front end for every workload, the HTTPS ones (j), (k), (l) included. No figure is checked against a
// target: a bench is never a timed test.
func TestBenchSmoke(t *testing.T) {
	privtest.Require(t)
	if testing.Short() {
		t.Skip("the bench smoke run takes about a minute")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "tcpha-bench")
	if out, err := exec.Command("go", "build", "-o", bin, "tcpha/cmd/tcpha-bench").CombinedOutput(); err != nil {
		t.Fatalf("build tcpha-bench: %v\n%s", err, out)
	}
	md, png := filepath.Join(dir, "b.md"), filepath.Join(dir, "b.png")
	out, err := exec.Command(bin, "-smoke", "-agent", agentBin, "-out", md, "-chart", png).CombinedOutput()
	if err != nil {
		t.Fatalf("tcpha-bench -smoke: %v\n%s", err, tailString(string(out), 3000))
	}
	report, err := os.ReadFile(md)
	if err != nil {
		t.Fatal(err)
	}
	r := string(report)
	for _, want := range []string{"### (a)", "### (b)", "### (c)", "### (d)", "### (e)",
		"| | tcpha | tcpha be | haproxy | nginx | direct |", "## Targets",
		"### (j)", "### (k)", "### (l)", "| | tcpha | haproxy-sni | haproxy-tls | nginx-preread | direct |", "### HTTPS targets"} {
		if !strings.Contains(r, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	// Every workload has a figure for every front end.
	for _, row := range []string{"| requests/s |", "| seconds |", "| time to first byte p50 |"} {
		for _, l := range strings.Split(r, "\n") {
			if strings.HasPrefix(l, row) && strings.Contains(l, "| — |") {
				t.Errorf("a front end has no figure: %s", l)
			}
		}
	}
	// The deliver workload (issue 15): be1's agent CPU for relay and
	// socket, and socket's connections delivered.
	for _, want := range []string{"## `[be] deliver`: relay beside socket", "| (a) 1 KB, one request per connection | BE agent CPU per request | "} {
		if !strings.Contains(r, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	if m := regexp.MustCompile(`\| \(a\) 1 KB[^|]*\| delivered / relayed \| — \| (\d+) / `).FindStringSubmatch(r); m == nil || m[1] == "0" {
		t.Errorf("the deliver workload delivered no connection of (a): %v", m)
	}
	if st, err := os.Stat(png); err != nil || st.Size() < 1000 {
		t.Errorf("chart: %v", err)
	}
	t.Logf("smoke report:\n%s", tailString(r, 2500))
}
