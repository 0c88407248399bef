package tests

import (
	"fmt"
	"slices"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// What the agents tell systemd: each feeds the watchdog (from its main
// loop, after its roles answered: agent/watchdog.go), and a stopping agent
// asks for its drain plus the margin, so that a drain longer than the
// unit's TimeoutStopSec is not cut by a SIGKILL.
func TestSystemdNotifications(t *testing.T) {
	c := newCluster(t, cluster.Options{Agent: agentBin, BEs: 1, Notify: true, Watchdog: 3 * time.Second, Rules: []string{"rule = be1 .*"},
		BEExtra: "drain = 50"})
	fed := func(host string) bool { return slices.Contains(c.Notifications(host), "WATCHDOG=1") }
	deadline := time.Now().Add(10 * time.Second)
	for !(fed("fe") && fed("be1")) && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	for _, h := range []string{"fe", "be1"} {
		if !fed(h) {
			t.Errorf("%s never fed the watchdog: %q", h, c.Notifications(h))
		}
	}
	for host, drain := range map[string]time.Duration{"fe": 20 * time.Second, "be1": 50 * time.Second} {
		if err := c.StopAgent(host, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("STOPPING=1\nEXTEND_TIMEOUT_USEC=%d", (drain + 20*time.Second).Microseconds())
		if notes := c.Notifications(host); !slices.Contains(notes, want) {
			t.Errorf("%s stopping: %q, want %q", host, notes, want)
		}
	}
}
