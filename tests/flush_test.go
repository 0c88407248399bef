package tests

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// TestFlushRuleset is issue 17's `nft flush ruleset` (what Debian's
// /etc/nftables.conf does on `systemctl reload nftables`) on the FE and
// both BEs: each agent puts its table back within a couple of seconds, the
// FE with the forwarding of a keep-alive connection handed off before, and
// logs it. Before, the FE answered every new request with 503, the
// handed-off connection was reset by the FE's own stack, and the BEs
// answered ARP for the VIP.
func TestFlushRuleset(t *testing.T) {
	for _, accept := range []string{"fe", "be"} {
		t.Run("accept = "+accept, func(t *testing.T) { testFlushRuleset(t, accept) })
	}
}

// testFlushRuleset flushes every host's ruleset under a keep-alive
// connection. With accept = be the FE's pins go with the table: the
// connection's packets go by hash to its slot's BE, the same, and it still
// moves between BEs.
func testFlushRuleset(t *testing.T, accept string) {
	c := newCluster(t, cluster.Options{
		BEs: 2, PublicWWW: accept == "be",
		Rules:   []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "accept = " + accept + "\n",
	})
	if accept == "be" {
		waitPlaced(t, c)
	}
	ka := dialKeepAlive(t, c)
	defer ka.conn.Close()
	if got, err := ka.get("/index.html"); err != nil || got != "200 be1" {
		t.Fatalf("keep-alive first request: %q %v", got, err)
	}
	flow := ka.local()

	start := time.Now()
	for _, h := range []string{"fe", "be1", "be2"} {
		if out, err := c.Output(context.Background(), h, "nft", "flush", "ruleset"); err != nil {
			t.Fatalf("%s: nft flush ruleset: %v %s", h, err, out)
		}
	}
	for deadline := start.Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, kernel := flowsOfQuiet(c)
		back := kernel[flow]
		if accept == "be" {
			slots, _ := c.Output(context.Background(), "fe", "nft", "list", "map", "ip", "tcpha", "slots")
			back = strings.Contains(slots, "jump place_10.77.0.12")
		}
		for _, be := range c.BEs {
			rs, _ := c.Output(context.Background(), be.Name, "nft", "list", "table", "arp", "tcpha")
			back = back && strings.Contains(rs, "arp saddr ip set "+be.UAddr)
		}
		if back {
			t.Logf("tables back %v after the flush", time.Since(start).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			fe, _ := c.Output(context.Background(), "fe", "nft", "list", "ruleset")
			t.Fatalf("tables not back 3 s after nft flush ruleset (forward has %s: %v); FE ruleset:\n%s", flow, kernel[flow], fe)
		}
	}

	for _, p := range [][2]string{{"/index.html", "200 be1"}, {"/img/a.jpg", "200 be2"}, {"/index.html", "200 be1"}} {
		if got, err := ka.get(p[0]); err != nil || got != p[1] {
			t.Errorf("keep-alive request for %s after the flush: %q %v, want %s", p[0], got, err, p[1])
		}
	}
	for path, want := range map[string]string{"/index.html": "200 be1", "/img/a.jpg": "200 be2"} {
		for range 3 {
			if got := servedBy(t, c, path); got != want {
				t.Errorf("%s after the flush: got %q, want %q", path, got, want)
			}
		}
	}
	feMAC, _ := c.MAC("fe")
	if neigh, _ := c.Output(context.Background(), "client", "ip", "neigh", "show", cluster.VIP); !strings.Contains(neigh, "lladdr "+feMAC) {
		t.Errorf("client's neighbour entry for the VIP is %q, want the FE's MAC %s", strings.TrimSpace(neigh), feMAC)
	}
	for _, h := range []string{"fe", "be1", "be2"} {
		if log := c.Grep(h, "our table changed under us"); !strings.Contains(log, "table missing") {
			t.Errorf("%s logged no reinstall:\n%s", h, log)
		}
		st, err := c.Admin(h, "status")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(st, "table reinstalls=1 ") {
			t.Errorf("%s status shows no reinstall:\n%s", h, st)
		}
	}
}

// flowsOfQuiet is flowsOf's forward map, with an empty map while the
// table is missing.
func flowsOfQuiet(c *cluster.Cluster) (string, map[string]bool) {
	m, err := c.Output(context.Background(), "fe", "nft", "-j", "list", "map", "ip", "tcpha", "forward")
	kernel := map[string]bool{}
	if err != nil {
		return m, kernel
	}
	for _, e := range reForwardElem.FindAllStringSubmatch(m, -1) {
		kernel[e[1]+":"+e[2]] = true
	}
	return m, kernel
}

var reForwardElem = regexp.MustCompile(`"concat": \["([0-9.]+)", (\d+)\]`)
