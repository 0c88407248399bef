package tests

import (
	"context"
	"io"
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

// TestFlushBEWithdrawsVIP is issue 17's ARP leak: a BE whose ARP filter is
// gone and cannot come back (here another program took the table's name,
// with the owner flag, in the flush's own batch) takes the VIP off lo, so
// the client's ARP request for the VIP is answered by the FE alone; the
// VIP comes back with the filter. Before, the BE kept the VIP, answered
// the ARP request, and could take the client's entry for the VIP.
func TestFlushBEWithdrawsVIP(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}})
	ctx := context.Background()
	be1 := c.BEs[0]
	be1MAC, _ := c.MAC("be1")
	feMAC, _ := c.MAC("fe")
	// The client counts ARP replies for the VIP from be1.
	watch := "add table arp h17watch { chain watch { type filter hook input priority 0; policy accept; " +
		"arp operation reply arp saddr ip " + cluster.VIP + " arp saddr ether " + be1MAC + " counter; }; }"
	if out, err := c.Output(ctx, "client", "nft", watch); err != nil {
		t.Fatalf("client ARP counter: %v %s", err, out)
	}

	// nft -i holds the owner socket until its stdin closes.
	holder := c.Exec(ctx, "be1", "nft", "-i")
	stdin, err := holder.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stdin.Close(); holder.Wait() }()
	if _, err := io.WriteString(stdin, "flush ruleset; add table arp tcpha { flags owner; }\n"); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(3 * time.Second); !strings.Contains(c.Grep("be1", "table not reinstalled"), "not permitted"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("be1 did not try to reinstall its table:\n%s", c.Grep("be1", "op=nft"))
		}
	}

	if out, err := c.Output(ctx, "client", "ip", "neigh", "flush", "dev", "eth0"); err != nil {
		t.Fatalf("flush the client's neighbours: %v %s", err, out)
	}
	// The client's ARP request goes to everyone on the link; be2
	// serves the request.
	if got := servedBy(t, c, "/img/a.jpg"); got != "200 be2" {
		t.Errorf("/img/a.jpg while be1 is without its filter: %q, want 200 be2", got)
	}
	if out, _ := c.Output(ctx, "client", "nft", "list", "chain", "arp", "h17watch", "watch"); !strings.Contains(out, "counter packets 0 ") {
		t.Errorf("be1 answered ARP for the VIP without its filter:\n%s", out)
	}
	if neigh, _ := c.Output(ctx, "client", "ip", "neigh", "show", cluster.VIP); !strings.Contains(neigh, "lladdr "+feMAC) {
		t.Errorf("client's neighbour entry for the VIP is %q, want the FE's MAC %s", strings.TrimSpace(neigh), feMAC)
	}
	if lo, _ := c.Output(ctx, "be1", "ip", "-4", "addr", "show", "dev", "lo"); strings.Contains(lo, cluster.VIP+"/32") {
		t.Errorf("be1 holds the VIP without its ARP filter:\n%s", lo)
	}
	if st, err := c.Admin("be1", "status"); err != nil || !strings.Contains(st, "vip withdrawn from lo") {
		t.Errorf("be1 status does not say the VIP is withdrawn (%v):\n%s", err, st)
	}

	// The holder goes, and its table with it: the filter, then the VIP,
	// come back.
	stdin.Close()
	holder.Wait()
	start := time.Now()
	for deadline := start.Add(3 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		lo, _ := c.Output(ctx, "be1", "ip", "-4", "addr", "show", "dev", "lo")
		rs, _ := c.Output(ctx, "be1", "nft", "list", "table", "arp", "tcpha")
		if strings.Contains(lo, cluster.VIP+"/32") && strings.Contains(rs, "arp saddr ip set "+be1.UAddr) {
			t.Logf("ARP filter and VIP back %v after the holder left", time.Since(start).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("be1's ARP filter and VIP not back 3 s after the holder left:\n%s\n%s", lo, rs)
		}
	}
	for range 3 {
		if got := servedBy(t, c, "/index.html"); got != "200 be1" {
			t.Errorf("/index.html once the VIP is back: %q, want 200 be1", got)
		}
	}
}
