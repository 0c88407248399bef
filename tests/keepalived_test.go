package tests

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// hasVIP tells whether the FE's eth0 holds the VIP.
func hasVIP(t *testing.T, c *cluster.Cluster) bool {
	t.Helper()
	out, err := c.Output(context.Background(), "fe", "ip", "-4", "-o", "addr", "show", "dev", "eth0")
	if err != nil {
		t.Fatalf("ip addr show on fe: %v", err)
	}
	return strings.Contains(out, " "+cluster.VIP+"/")
}

// tryCurl fetches url from the client and returns the status and the BE
// that served it, or curl's error.
func tryCurl(c *cluster.Cluster) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := c.Output(ctx, "client", "curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}", url+"/index.html")
	return strings.TrimSpace(out), err
}

// keepalivedConf is etc/keepalived.conf for the cluster's FE: its VIP,
// the test's tcphactl and the FE agent's config.
func keepalivedConf(t *testing.T, c *cluster.Cluster) string {
	t.Helper()
	b, err := os.ReadFile("../etc/keepalived.conf")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b) // eth0 is the FE's interface in the cluster too
	for old, new := range map[string]string{
		"192.168.1.36/32":            cluster.VIP + "/32",
		"/usr/local/bin/tcphactl":    ctlBin,
		"/etc/tcpha/tcpha.conf":      c.ConfigFile("fe"),
		"vrrp_garp_master_delay 5\n": "vrrp_garp_master_delay 1\n",
	} {
		if !strings.Contains(s, old) {
			t.Fatalf("etc/keepalived.conf no longer says %q", old)
		}
		s = strings.ReplaceAll(s, old, new)
	}
	path := filepath.Join(c.Dir, "keepalived.conf")
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// With [fe] vip = keepalived the agent leaves the VIP to keepalived (issue
// 17, item 1): it starts and listens without the VIP (IP_FREEBIND), serves
// as soon as the address appears, and leaves it in place when it stops.
// Then the real keepalived, with the shipped config, brings the VIP up,
// the agent serves through it, and its track script (tcphactl status)
// releases the VIP when the agent dies.
func TestVIPKeepalived(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 1, Rules: []string{"rule = be1 .*"}, FEExtra: "vip = keepalived\n"})
	if hasVIP(t, c) {
		t.Fatal("the agent added the VIP with vip = keepalived")
	}
	if out, err := tryCurl(c); err == nil {
		t.Fatalf("curl to a VIP nobody holds answered %q", out)
	}
	// The test plays keepalived: the address appears on the standby, the
	// client forgets the failed ARP resolution.
	ctx := context.Background()
	if out, err := c.Output(ctx, "fe", "ip", "addr", "add", cluster.VIP+"/32", "dev", "eth0"); err != nil {
		t.Fatalf("add the VIP: %v %s", err, out)
	}
	if out, err := c.Output(ctx, "client", "ip", "neigh", "flush", "dev", "eth0"); err != nil {
		t.Fatalf("flush the client's neighbours: %v %s", err, out)
	}
	if out, err := tryCurl(c); err != nil || out != "200 be1" {
		t.Fatalf("curl once the VIP is up: %q %v, want 200 be1 (handed off)", out, err)
	}
	if err := c.StopAgent("fe", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !hasVIP(t, c) {
		t.Fatal("the agent removed keepalived's VIP when it stopped")
	}
	if out, err := c.Output(ctx, "fe", "ip", "addr", "del", cluster.VIP+"/32", "dev", "eth0"); err != nil {
		t.Fatalf("remove the VIP: %v %s", err, out)
	}

	// The real keepalived, with the shipped config.
	kconf := keepalivedConf(t, c)
	log := filepath.Join(c.Dir, "keepalived-check.log")
	if out, err := exec.Command("keepalived", "--config-test="+log, "-f", kconf).CombinedOutput(); err != nil {
		b, _ := os.ReadFile(log)
		t.Fatalf("keepalived -t %s: %v %s %s", kconf, err, out, b)
	}
	if err := c.StartAgent("fe"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.StartDaemon("fe", "keepalived", "keepalived", "-n", "-l", "-D", "-P", "-f", kconf,
		"-p", filepath.Join(c.Dir, "keepalived.pid"), "-r", filepath.Join(c.Dir, "keepalived-vrrp.pid")); err != nil {
		t.Fatal(err)
	}
	klog := func() string {
		b, _ := os.ReadFile(filepath.Join(c.Dir, "keepalived.log"))
		return tailString(string(b), 3000)
	}
	// Alone on the link, the BACKUP becomes MASTER after 3 advert_int and
	// its skew: about 3 s.
	deadline := time.Now().Add(15 * time.Second)
	for !hasVIP(t, c) {
		if time.Now().After(deadline) {
			t.Fatalf("keepalived did not add the VIP in 15 s:\n%s", klog())
		}
		time.Sleep(100 * time.Millisecond)
	}
	start := time.Now()
	for {
		out, err := tryCurl(c)
		if err == nil && out == "200 be1" {
			break
		}
		if time.Since(start) > 10*time.Second {
			t.Fatalf("curl through keepalived's VIP: %q %v\n%s", out, err, klog())
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("served %v after keepalived added the VIP", time.Since(start).Round(time.Millisecond))
	// An upgrade (-upgrade) hands the FREEBIND listener over; the VIP stays.
	if err := c.UpgradeAgent("fe", true); err != nil {
		t.Fatal(err)
	}
	if out, err := tryCurl(c); err != nil || out != "200 be1" || !hasVIP(t, c) {
		t.Fatalf("after an upgrade: curl %q %v, VIP held %v", out, err, hasVIP(t, c))
	}
	// The agent dies: tcphactl status fails, the instance goes to FAULT
	// and keepalived takes the VIP away (fall 2, interval 1).
	if err := c.StopAgent("fe", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(15 * time.Second)
	for hasVIP(t, c) {
		if time.Now().After(deadline) {
			t.Fatalf("keepalived kept the VIP 15 s after the agent died:\n%s", klog())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !strings.Contains(klog(), "FAULT") {
		t.Errorf("keepalived's log does not show the FAULT state:\n%s", klog())
	}
}
