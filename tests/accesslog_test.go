package tests

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"tcpha/internal/accesslog"
	cluster "tcpha/internal/nscluster"
)

// [global] accesslog (issue 16, item 4): one line per request on the BEs,
// keep-alive ones included, for a connection that moves between BEs with
// every request (phttp = multi); one line on the FE for the connection;
// SIGHUP reopens the file after logrotate moved it.
func TestAccessLog(t *testing.T) {
	dir := t.TempDir()
	logOf := func(host string) string { return filepath.Join(dir, host+"-access.log") }
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		FEExtra: "phttp = multi\ndtcinterval = 1\n",
		Edit: func(host, conf string) string {
			return strings.Replace(conf, "[global]\n", "[global]\naccesslog = "+logOf(host)+"\n", 1)
		}})
	deadline := time.Now().Add(10 * time.Second)
	for _, b := range c.BEs {
		for c.Grep(b.Name, `msg="cluster rules from the FE"`) == "" {
			if time.Now().After(deadline) {
				t.Fatalf("%s got no cluster frame", b.Name)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	ip := map[string]string{}
	for _, b := range c.BEs {
		ip[b.Name] = b.IP
	}

	k := dialKeepAlive(t, c)
	client := k.local()
	for i := range 20 {
		p, want := "/index.html", "200 be1"
		if i%2 == 1 {
			p, want = "/img/a.jpg", "200 be2"
		}
		if got, err := k.get(p); err != nil || got != want {
			t.Fatalf("request %d %s: %q %v, want %q", i, p, got, err, want)
		}
	}
	k.conn.Close()

	// Lines wait up to a second in the agents' buffers.
	lines := func(path string, want int) [][]string {
		t.Helper()
		var got [][]string
		deadline := time.Now().Add(5 * time.Second)
		for {
			b, _ := os.ReadFile(path)
			got = nil
			for l := range strings.Lines(string(b)) {
				got = append(got, accesslog.Split(l))
			}
			if len(got) >= want || time.Now().After(deadline) {
				return got
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	// The BE's fields: 2 client, 5 target, 6 status, 8 served, 9 BE.
	served, moved := 0, 0
	for _, be := range []struct{ name, target string }{{"be1", `"/index.html"`}, {"be2", `"/img/a.jpg"`}} {
		// be1 serves 10 and moves the connection away 10 times; be2
		// serves 10 and moves it 9 times.
		ls := lines(logOf(be.name), 19)
		for _, f := range ls {
			if len(f) != accesslog.Fields || f[1] != "be" || f[2] != client {
				t.Errorf("%s: line %q", be.name, f)
				continue
			}
			switch f[8] {
			case "here":
				served++
				if f[5] != be.target || f[6] != "200" || f[9] != ip[be.name] || f[7] == "0" {
					t.Errorf("%s served %q", be.name, f)
				}
			case "move":
				moved++
				if f[5] == be.target || f[6] != "-" || f[10] == "-" {
					t.Errorf("%s moved %q", be.name, f)
				}
			default:
				t.Errorf("%s: %q", be.name, f)
			}
		}
	}
	if served != 20 || moved != 19 {
		t.Errorf("the BEs' logs: %d requests served, %d moves; want 20 and 19", served, moved)
	}
	fe := lines(logOf("fe"), 1)
	if len(fe) != 1 {
		t.Fatalf("the FE's log has %d lines, want 1: %q", len(fe), fe)
	}
	if f := fe[0]; len(f) != accesslog.Fields || f[1] != "fe" || f[2] != client || f[5] != `"/index.html"` ||
		f[8] != "handoff" || f[9] != ip["be1"] || f[10] == "-" {
		t.Errorf("the FE's line %q", f)
	}

	t.Run("SIGHUP reopens", func(t *testing.T) {
		path := logOf("be1")
		if err := os.Rename(path, path+".1"); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Kill(c.AgentPID("be1"), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for _, err := os.Stat(path); err != nil; _, err = os.Stat(path) {
			if time.Now().After(deadline) {
				t.Fatalf("no new access log after SIGHUP: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		if got, err := k.get("/index.html?after=hup"); err != nil || got != "200 be1" {
			t.Fatalf("after SIGHUP: %q %v", got, err)
		}
		if ls := lines(path, 1); len(ls) != 1 || ls[0][5] != `"/index.html?after=hup"` {
			t.Errorf("the new file: %q", ls)
		}
		if old := lines(path+".1", 20); len(old) != 20 {
			t.Errorf("the rotated file has %d lines, want the 20 before SIGHUP", len(old))
		}
	})
}
