package tests

import (
	"bufio"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
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
// them (multi moves the connection, forward fetches from the other BE).
func TestHostRules(t *testing.T) {
	for _, mode := range []string{"multi", "forward"} {
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
