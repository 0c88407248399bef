package tests

import (
	"context"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// An FE starts beside a web server on its own address, port 80 (issue 18:
// the registration listener took raddr:80 whenever a secret was set), and
// both serve; then a normal stop logs no warning (it logged "BE not
// available ... control session closed" for each BE).
func TestFEBesideWebServerStopsQuietly(t *testing.T) {
	c := newClusterWithout(t, cluster.Options{BEs: 2, Rules: []string{`rule = be1 .*`}}, "fe")
	// A web server of the host's own on raddr:80.
	if _, err := c.StartDaemon("fe", "fe-www", "python3", "-m", "http.server", "--bind", cluster.FEIP, "80",
		"--directory", c.Dir); err != nil {
		t.Fatal(err)
	}
	own := net.JoinHostPort(cluster.FEIP, "80")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := c.Dial(ctx, "client", 0, own)
		cancel()
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the web server on %s never listened: %v", own, err)
		}
	}
	if err := c.StartAgent("fe"); err != nil {
		t.Fatalf("the FE does not start beside a web server on %s: %v", own, err)
	}
	if got := servedBy(t, c, "/index.html"); got != "200 be1" {
		t.Errorf("through the VIP: %q, want 200 be1", got)
	}
	if got := strings.TrimSpace(curl(t, c, "-o", "/dev/null", "-w", "%{http_code}", "http://"+own+"/")); got != "200" {
		t.Errorf("the host's own web server on %s: %q, want 200", own, got)
	}
	if err := c.StopAgentAsync("fe", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitAgent("fe", 30*time.Second); err != nil {
		t.Fatalf("the FE's stop: %v", err)
	}
	if warn := c.Grep("fe", "level=WARN"); warn != "" {
		t.Errorf("a normal stop logged warnings:\n%s", warn)
	}
	if c.Grep("fe", "level=ERROR") != "" {
		t.Errorf("a normal stop logged errors:\n%s", c.Grep("fe", "level=ERROR"))
	}
}
