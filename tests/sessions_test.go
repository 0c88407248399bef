package tests

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// With the default connperbe = 2 and 64 clients at once, the FE hands off
// over its sessions only: no control connection is dialed for a handoff,
// so none is ever left in TIME_WAIT either (issue 6: dialing per handoff
// filled the FE with TIME_WAIT sockets whose bind search took 30 % of the
// machine).
func TestNoControlDialsUnderLoad(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}})
	controlSockets := func() (established, other int, lines string) {
		out, err := c.Output(context.Background(), "fe", "ss", "-Htan", "( dport = :666 )")
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			switch f := strings.Fields(l); {
			case len(f) == 0:
			case f[0] == "ESTAB":
				established++
			default:
				other++
			}
		}
		return established, other, out
	}
	if est, other, out := controlSockets(); est != 4 || other != 0 {
		t.Fatalf("before load: %d established, %d other control sockets, want 4 and 0:\n%s", est, other, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	wrk := c.Exec(ctx, "client", "wrk", "-t2", "-c64", "-d4s", "-H", "Connection: close", url+"/index.html")
	done := make(chan []byte, 1)
	go func() { out, _ := wrk.CombinedOutput(); done <- out }()
	maxEst, maxOther := 0, 0
	var sample string
	for len(done) == 0 {
		est, other, out := controlSockets()
		if est > maxEst || other > maxOther {
			maxEst, maxOther, sample = max(est, maxEst), max(other, maxOther), out
		}
		time.Sleep(200 * time.Millisecond)
	}
	out := string(<-done)
	m := regexp.MustCompile(`(\d+) requests in`).FindStringSubmatch(out)
	if m == nil || strings.Contains(out, "Non-2xx") {
		t.Fatalf("wrk: %s", out)
	}
	t.Logf("wrk: %s requests; control sockets at most %d established, %d in other states", m[1], maxEst, maxOther)
	if maxEst != 4 || maxOther != 0 {
		t.Errorf("control sockets under load: at most %d established and %d in other states, want 4 and 0:\n%s", maxEst, maxOther, sample)
	}
}
