package netif

import (
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"

	"tcpha/internal/privtest"
)

// SetupTransparent adds the fwmark rule, the local route and
// tcp_fwmark_accept in the namespace; Remove takes them out and restores
// the sysctl; a second Setup over a predecessor's (an upgrade) succeeds.
func TestSetupTransparent(t *testing.T) {
	ns, _ := privtest.NetNS(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		h, err := netns.GetFromName(ns)
		if err == nil {
			err = netns.Set(h)
			h.Close()
		}
		if err != nil {
			t.Errorf("enter %s: %v", ns, err)
			return
		}
		sysctl := func() string { b, _ := os.ReadFile(fwmarkAccept); return strings.TrimSpace(string(b)) }
		if got := sysctl(); got != "0" {
			t.Errorf("tcp_fwmark_accept in a fresh namespace: %q", got)
		}
		tr, err := SetupTransparent()
		if err != nil {
			t.Error(err)
			return
		}
		if got := sysctl(); got != "1" {
			t.Errorf("tcp_fwmark_accept after setup: %q", got)
		}
		next, err := SetupTransparent() // the successor of an upgrade
		if err != nil {
			t.Errorf("setup over a predecessor's: %v", err)
			return
		}
		tr.Keep()
		tr.Remove() // kept: a no-op
		if got := privtest.In(t, ns, "ip", "rule", "show"); !strings.Contains(got, "fwmark 0x7463 lookup 7463") {
			t.Errorf("ip rule after setup:\n%s", got)
		}
		if got := privtest.In(t, ns, "ip", "route", "show", "table", "7463"); !strings.Contains(got, "local default dev lo") {
			t.Errorf("table 7463 after setup:\n%s", got)
		}
		if err := next.Remove(); err != nil {
			t.Error(err)
		}
		if got := privtest.In(t, ns, "ip", "rule", "show"); strings.Contains(got, "7463") {
			t.Errorf("ip rule after remove:\n%s", got)
		}
		if got := privtest.In(t, ns, "ip", "route", "show", "table", "7463"); strings.TrimSpace(got) != "" {
			t.Errorf("table 7463 after remove:\n%s", got)
		}
	}()
	<-done
}
