package tests

import (
	"context"
	"strings"
	"testing"

	cluster "tcpha/internal/nscluster"
)

// The sysctls docs/deployment.md says need no change: with strict reverse
// path filtering and LVS-DR's ARP settings (arp_ignore = 1, arp_announce =
// 2) on every host, the cluster serves as with the defaults, both BEs by
// rule, and the client's ARP entry for the VIP stays the FE's.
func TestDeploymentSysctls(t *testing.T) {
	c := newClusterWithout(t, cluster.Options{BEs: 2, Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}}, "fe", "be1", "be2")
	for _, h := range []string{"client", "fe", "be1", "be2"} {
		for _, kv := range []string{"net.ipv4.conf.all.rp_filter=1", "net.ipv4.conf.default.rp_filter=1", "net.ipv4.conf.eth0.rp_filter=1",
			"net.ipv4.conf.all.arp_ignore=1", "net.ipv4.conf.all.arp_announce=2"} {
			if out, err := c.Output(context.Background(), h, "sysctl", "-qw", kv); err != nil {
				t.Fatalf("%s: sysctl %s: %v %s", h, kv, err, out)
			}
		}
	}
	for _, h := range []string{"be1", "be2", "fe"} {
		if err := c.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	for range 5 {
		if got := servedBy(t, c, "/index.html"); got != "200 be1" {
			t.Errorf("/index.html: %q, want 200 be1", got)
		}
		if got := servedBy(t, c, "/img/a.jpg"); got != "200 be2" {
			t.Errorf("/img/a.jpg: %q, want 200 be2", got)
		}
	}
	// A keep-alive connection whose later requests the FE forwards in the
	// kernel to the BE.
	if out := curl(t, c, "-o", "/dev/null", "-w", "%header{x-served-by} ", url+"/index.html", "-o", "/dev/null", url+"/index.html"); out != "be1 be1 " {
		t.Errorf("keep-alive: %q, want be1 twice", out)
	}
	feMAC, err := c.MAC("fe")
	if err != nil {
		t.Fatal(err)
	}
	neigh, err := c.Output(context.Background(), "client", "ip", "neigh", "show", cluster.VIP)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.ToLower(neigh), strings.ToLower(feMAC)) {
		t.Errorf("the client's ARP entry for the VIP is %q, want the FE's MAC %s", neigh, feMAC)
	}
}
