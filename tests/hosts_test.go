package tests

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// getAs sends one request for path with the given Host on k's connection.
func (k *keepAlive) getAs(host, path string) (string, error) {
	k.conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(k.conn, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, host)
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if _, err := bufio.NewReader(resp.Body).WriteTo(new(strings.Builder)); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d %s", resp.StatusCode, resp.Header.Get("X-Served-By")), nil
}

// Issue 16: rules on the Host. One cluster serves img.example from be2 and
// everything else from be1, for new connections (curl) and for later
// requests on one keep-alive connection in every phttp mode that routes
// them (multi moves the connection, forward fetches from the other BE),
// and with accept = be, where the BEs route the first request too.
func TestHostRules(t *testing.T) {
	for _, mode := range []string{"multi", "forward", "multi, accept = be"} {
		t.Run(mode, func(t *testing.T) {
			c := phttpClusterRules(t, mode, `rule = be2 host=img\.example`, `rule = be1 .*`)
			for _, tc := range []struct{ host, want string }{
				{"img.example", "200 be2"},
				{"IMG.example:80", "200 be2"},
				{"www.example", "200 be1"},
				{"img.example.evil", "200 be1"},
			} {
				got := strings.TrimSpace(curl(t, c, "-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}",
					"-H", "Host: "+tc.host, url+"/index.html"))
				if got != tc.want {
					t.Errorf("Host %s: %q, want %q", tc.host, got, tc.want)
				}
			}
			ka := dialKeepAlive(t, c)
			defer ka.conn.Close()
			for i, tc := range []struct{ host, want string }{
				{"www.example", "200 be1"}, {"img.example", "200 be2"}, {"www.example", "200 be1"}, {"img.example", "200 be2"},
			} {
				if got, err := ka.getAs(tc.host, "/index.html"); err != nil || got != tc.want {
					t.Fatalf("keep-alive request %d, Host %s: %q %v, want %q", i+1, tc.host, got, err, tc.want)
				}
			}
		})
	}
}

// Issue 16: with [be] forwardedfor = on, nginx (set_real_ip_from
// 127.0.0.1; real_ip_header X-Forwarded-For) logs the client's own
// address for a handed-off connection's first request and for a later
// one relayed from another BE; without it, the relay's 127.0.0.1. In both
// accept modes: with accept = be the first request is read by the BE the
// connection lands on, and moved to be1 if it landed on be2.
func TestForwardedFor(t *testing.T) {
	for _, tc := range []struct {
		on     bool
		accept string
	}{{true, "fe"}, {false, "fe"}, {true, "be"}, {false, "be"}} {
		on := tc.on
		t.Run(fmt.Sprintf("forwardedfor=%v, accept = %s", on, tc.accept), func(t *testing.T) {
			c := newCluster(t, cluster.Options{BEs: 2, PublicWWW: true,
				Rules:   []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
				FEExtra: "phttp = forward\naccept = " + tc.accept + "\n", BEExtra: fmt.Sprintf("forwardedfor = %v\n", map[bool]string{true: "on", false: "off"}[on])})
			if tc.accept == "be" {
				waitPlaced(t, c)
			}
			curl(t, c, "-o", "/dev/null", url+"/index.html?first", "-o", "/dev/null", url+"/img/a.jpg?later")
			// Without it, the first request comes from be1's relay, the
			// later one from be1's relay fetching from be2.
			want := map[string]string{"be1": cluster.ClientIP, "be2": cluster.ClientIP}
			if !on {
				want = map[string]string{"be1": "127.0.0.1", "be2": c.BEs[0].IP}
			}
			for host, query := range map[string]string{"be1": "first", "be2": "later"} {
				deadline := time.Now().Add(5 * time.Second)
				for {
					log, _ := os.ReadFile(filepath.Join(c.Dir, host, "access.log"))
					line := ""
					for _, l := range strings.Split(string(log), "\n") {
						if strings.Contains(l, "?"+query) {
							line = l
						}
					}
					if line != "" {
						if got, _, _ := strings.Cut(line, " "); got != want[host] {
							t.Errorf("%s's nginx logged %q for the %s request, want %s", host, got, query, want[host])
						}
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("%s's nginx logged no %s request:\n%s", host, query, log)
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
}
