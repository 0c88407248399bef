package tests

import (
	"bufio"
	"context"
	"crypto/md5"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

const tlsURL = "https://" + cluster.VIP

// tlsCluster is a cluster with TLS on the VIP's port 443 and on every BE's
// nginx (a self-signed certificate for a.example and b.example), routing
// a.example to be1 and b.example to be2 by SNI, anything else to be1.
// b.example's rule comes first: a connection without SNI must skip it for
// the first rule without host= (be1), not take the first rule.
func tlsCluster(t *testing.T, proxyProtocol bool) *cluster.Cluster {
	t.Helper()
	return tlsClusterWith(t, proxyProtocol, "")
}

// tlsClusterWith is tlsCluster with more [be] lines.
func tlsClusterWith(t *testing.T, proxyProtocol bool, beExtra string) *cluster.Cluster {
	t.Helper()
	return tlsClusterFE(t, proxyProtocol, beExtra, "")
}

// tlsClusterFE is tlsCluster with more [be] and [fe] lines.
func tlsClusterFE(t *testing.T, proxyProtocol bool, beExtra, feExtra string) *cluster.Cluster {
	t.Helper()
	opts := cluster.Options{BEs: 2, TLS: true, ProxyProtocol: proxyProtocol,
		Rules:   []string{`rule = be2 host=b\.example`, `rule = be1 host=a\.example`, `rule = be1 .*`},
		FEExtra: "tlsport = 443\n" + feExtra, BEExtra: beExtra}
	if proxyProtocol {
		opts.BEExtra += "proxyprotocol = on\n"
	}
	return newCluster(t, opts)
}

// curlTLS fetches https://name/path through the VIP and returns the status
// and X-Served-By.
func curlTLS(t *testing.T, c *cluster.Cluster, name, path string) string {
	t.Helper()
	return strings.TrimSpace(curl(t, c, "-k", "--resolve", name+":443:"+cluster.VIP, "-o", "/dev/null",
		"-w", "%{http_code} %header{x-served-by}", "https://"+name+path))
}

// Issue 16, item 2: HTTPS routed by SNI and handed off, the responses
// going to the client from the BE; with [be] deliver = socket (issue 15
// item 3) the same with each TLS connection handed to nginx's own TLS
// socket, no relay on the BE. The subtests that do not reach a BE run
// once.
func TestTLS(t *testing.T) {
	for _, deliver := range []string{"relay", "socket"} {
		t.Run("deliver="+deliver, func(t *testing.T) { testTLS(t, deliver) })
	}
}

func testTLS(t *testing.T, deliver string) {
	socket := deliver == "socket"
	beExtra, feExtra := "", ""
	if socket {
		// drain = 1: the FE's stop at the end would wait out its drain
		// for the connections nginx held (5 s, the cluster's limit).
		beExtra, feExtra = "deliver = socket\n", "drain = 1\n"
	}
	c := tlsClusterFE(t, false, beExtra, feExtra)

	if !socket {
		t.Run("tcphactl status names the TLS port", func(t *testing.T) {
			out, err := c.Admin("fe", "status")
			// Its FE line: the version line comes first.
			if want := "\nfe vip=" + cluster.VIP + ":80 tls=" + cluster.VIP + ":443 "; err != nil || !strings.Contains("\n"+out, want) {
				t.Errorf("status: %v\n%s\nwant a line starting %q", err, out, want[1:])
			}
		})
	}

	t.Run("routed by SNI", func(t *testing.T) {
		for name, want := range map[string]string{"a.example": "200 be1", "b.example": "200 be2", "c.example": "200 be1"} {
			if got := curlTLS(t, c, name, "/index.html"); got != want {
				t.Errorf("%s: %q, want %q", name, got, want)
			}
		}
		// The certificate is the BE's: it verifies for the name.
		got := strings.TrimSpace(curl(t, c, "--cacert", c.TLSCert(), "--resolve", "b.example:443:"+cluster.VIP,
			"-w", " %header{x-served-by}", "https://b.example/index.html"))
		if got != "index from be2\n be2" && got != "index from be2 be2" {
			t.Errorf("verified b.example: %q", got)
		}
	})

	t.Run("no SNI gets the first rule without host=", func(t *testing.T) {
		// curl sends no SNI for an IP address.
		if got := strings.TrimSpace(curl(t, c, "-k", "-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}", tlsURL+"/index.html")); got != "200 be1" {
			t.Errorf("curl to the VIP's address: %q, want 200 be1", got)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		cmd := c.Exec(ctx, "client", "openssl", "s_client", "-connect", cluster.VIP+":443", "-noservername", "-quiet", "-ign_eof")
		cmd.Stdin = strings.NewReader("GET /index.html HTTP/1.0\r\nHost: b.example\r\n\r\n")
		out, err := cmd.Output()
		if err != nil || !strings.Contains(string(out), "X-Served-By: be1") {
			t.Errorf("openssl s_client -noservername: %v\n%s", err, out)
		}
	})

	t.Run("HTTP/2", func(t *testing.T) {
		got := strings.TrimSpace(curl(t, c, "-k", "--http2", "--resolve", "b.example:443:"+cluster.VIP, "-o", "/dev/null",
			"-w", "%{http_code} %header{x-served-by} %{http_version}", "https://b.example/index.html"))
		if got != "200 be2 2" {
			t.Errorf("curl --http2: %q, want 200 be2 2", got)
		}
	})

	t.Run("20 MB download bypasses the FE", func(t *testing.T) {
		bigBypassesFE(t, c, "be2", "20 MB over TLS", "-k", "--resolve", "b.example:443:"+cluster.VIP, "https://b.example/big.bin")
	})

	t.Run("a ClientHello in three segments and two records", func(t *testing.T) {
		raw, err := c.Dial(context.Background(), "client", 0, cluster.VIP+":443")
		if err != nil {
			t.Fatal(err)
		}
		defer raw.Close()
		raw.(*net.TCPConn).SetNoDelay(true)
		conn := tls.Client(&splitHello{Conn: raw}, &tls.Config{ServerName: "b.example", InsecureSkipVerify: true})
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "GET /index.html HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if by := resp.Header.Get("X-Served-By"); resp.StatusCode != 200 || by != "be2" {
			t.Errorf("split ClientHello for b.example: %d from %q, want 200 from be2", resp.StatusCode, by)
		}
		local := raw.LocalAddr().String()
		if line := c.Grep("fe", "client="+local+" "); !strings.Contains(line, "records=2") {
			t.Errorf("the FE did not read the hello as two records:\n%s", line)
		}
	})

	if socket {
		testTLSDelivered(t, c)
		return
	}

	t.Run("plain HTTP and garbage on the TLS port", func(t *testing.T) {
		if got := strings.TrimSpace(curl(t, c, "-o", "/dev/null", "-w", "%{http_code}", "http://"+cluster.VIP+":443/")); got != "400" {
			t.Errorf("plain HTTP to port 443: %q, want 400", got)
		}
		conn, err := c.Dial(context.Background(), "client", 0, cluster.VIP+":443")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.Write([]byte("\x00\x01garbage garbage\r\n\r\n"))
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		start := time.Now()
		b, err := io.ReadAll(conn)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("garbage: the connection hung for %v", time.Since(start))
		}
		if len(b) != 0 {
			t.Errorf("garbage: answered % x, want a close", b)
		}
	})
}

// testTLSDelivered is TestTLS's part for deliver = socket alone: nginx
// owns the TLS connection and logs the client, and serves it after the
// BE's agent is killed.
func testTLSDelivered(t *testing.T, c *cluster.Cluster) {
	conn := tlsKeepAlive(t, c, "b.example")
	defer conn.Close()
	t.Run("nginx owns the connection and logs the client", func(t *testing.T) {
		if got := conn.get(t, "/index.html?tls-delivered"); got != "200 be2" {
			t.Fatalf("first request: %q", got)
		}
		ss := ssClient(t, c, "be2", conn.LocalAddr().String())
		t.Logf("ss -tnp on be2: %s", strings.TrimSpace(ss))
		if !strings.Contains(ss, `"nginx"`) || strings.Contains(ss, "tcpha-agent") {
			t.Errorf("ss -tnp on be2 for %s:\n%s", conn.LocalAddr(), ss)
		}
		// Dialed from the client's address (clientaddr = on): nginx's
		// peer is the client, with no PROXY header.
		if line := accessLine(t, c, "be2", "/index.html?tls-delivered"); !strings.HasPrefix(line, cluster.ClientIP+" ") {
			t.Errorf("nginx's access log: %q; want the client %s first", line, cluster.ClientIP)
		}
	})
	// Every TLS connection so far was delivered, none relayed (a
	// fallback would pass the other checks unseen).
	for _, be := range []string{"be1", "be2"} {
		d, r := statusOf(t, c, be, "tls_delivered"), statusOf(t, c, be, "tls_relayed")
		t.Logf("%s: %d TLS connections delivered, %d relayed", be, d, r)
		if d == 0 || r != 0 {
			t.Errorf("%s: tls_delivered=%d tls_relayed=%d, want every TLS connection delivered; the first reasons:\n%s",
				be, d, r, firstLines(c.Grep(be, "connection relayed"), 3))
		}
	}
	t.Run("served after the BE agent's kill -9", func(t *testing.T) {
		if err := c.StopAgent("be2", syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			if got := conn.get(t, fmt.Sprintf("/index.html?after-kill-%d", i)); got != "200 be2" {
				t.Errorf("request %d after be2's agent was killed: %q", i, got)
			}
		}
	})
}

// splitHello writes its first write, the ClientHello record, as two
// records (the handshake message cut in two) in three TCP segments.
type splitHello struct {
	net.Conn
	once sync.Once
}

func (s *splitHello) Write(b []byte) (int, error) {
	first := false
	s.once.Do(func() { first = true })
	if !first || len(b) < 100 || b[0] != 22 {
		return s.Conn.Write(b)
	}
	msg := b[5:]
	rec := func(p []byte) []byte { return append([]byte{22, b[1], b[2], byte(len(p) >> 8), byte(len(p))}, p...) }
	wire := append(rec(msg[:50]), rec(msg[50:])...)
	for _, part := range [][]byte{wire[:3], wire[3:80], wire[80:]} {
		if _, err := s.Conn.Write(part); err != nil {
			return 0, err
		}
		time.Sleep(30 * time.Millisecond)
	}
	return len(b), nil
}

// Issue 16, item 3: with [be] proxyprotocol = on, each upstream TLS
// connection starts with a PROXY v2 header, and nginx (listen ...
// proxy_protocol; real_ip_header proxy_protocol;) logs the client's own
// address for an HTTPS request. With deliver = socket the header is put
// in the receive queue of nginx's socket ahead of the ClientHello: nginx
// would refuse the connection without it, and with clientaddr = off
// (nginx's peer 127.0.0.1) it alone names the client.
func TestTLSProxyProtocol(t *testing.T) {
	for _, v := range []struct{ name, extra string }{
		{"relay", ""},
		{"socket", "deliver = socket\n"},
		{"socket clientaddr=off", "deliver = socket\nclientaddr = off\n"},
	} {
		t.Run(v.name, func(t *testing.T) {
			c := tlsClusterWith(t, true, v.extra)
			if got := curlTLS(t, c, "a.example", "/index.html?pp"); got != "200 be1" {
				t.Fatalf("a.example: %q, want 200 be1", got)
			}
			if line := accessLine(t, c, "be1", "/index.html?pp"); !strings.HasPrefix(line, cluster.ClientIP+" ") {
				t.Errorf("nginx logged %q, want the client's address %s first", line, cluster.ClientIP)
			}
			if v.extra != "" {
				if d, r := statusOf(t, c, "be1", "tls_delivered"), statusOf(t, c, "be1", "tls_relayed"); d != 1 || r != 0 {
					t.Errorf("be1: tls_delivered=%d tls_relayed=%d, want 1 and 0; the first reasons:\n%s", d, r,
						firstLines(c.Grep("be1", "connection relayed"), 3))
				}
			}
		})
	}
}

// The FE's TLS listener goes to its successor on an upgrade with the
// VIP's: a TLS connection handed off before it goes on, and new ones are
// accepted after it. On a BE's upgrade, its TLS relays go to the successor
// too, an idle keep-alive connection and a download in mid-body.
func TestTLSUpgrade(t *testing.T) {
	// A short drain: a TLS relay left in the old BE agent is cut 3 s
	// after the upgrade, well within the download below.
	c := tlsClusterWith(t, false, "drain = 3s\n")
	conn := tlsKeepAlive(t, c, "b.example")
	defer conn.Close()
	if got := conn.get(t, "/index.html?before"); got != "200 be2" {
		t.Fatalf("before the upgrade: %q", got)
	}
	// New TLS connections all along: the listener is handed over, never
	// closed and opened again.
	stop := make(chan struct{})
	var fails []string
	var n int
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			out, err := c.Output(ctx, "client", "curl", "-sS", "-k", "--resolve", "a.example:443:"+cluster.VIP,
				"-o", "/dev/null", "-w", "%{http_code}", "https://a.example/index.html")
			cancel()
			n++
			if err != nil || out != "200" {
				fails = append(fails, fmt.Sprintf("%q %v", out, err))
			}
		}
	})
	time.Sleep(200 * time.Millisecond)
	err := c.UpgradeAgent("fe", true)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d TLS connections during the upgrade", n)
	if len(fails) > 0 {
		t.Errorf("%d of %d TLS connections during the upgrade failed: %v", len(fails), n, fails)
	}
	if got := conn.get(t, "/index.html?after"); got != "200 be2" {
		t.Errorf("the connection handed off before the upgrade, after it: %q", got)
	}
	// The successor asked each BE which flows it holds when its sessions
	// came up: a BE that left its TLS port's flows out would have its
	// TLS connections ended here, within a second or two.
	time.Sleep(3 * time.Second)
	if got := conn.get(t, "/index.html?later"); got != "200 be2" {
		t.Errorf("the connection handed off before the upgrade, 3 s after it: %q", got)
	}
	if got := curlTLS(t, c, "a.example", "/index.html"); got != "200 be1" {
		t.Errorf("a new TLS connection after the upgrade: %q", got)
	}

	t.Run("BE: TLS relays handed to the successor", func(t *testing.T) {
		// Before, a BE's TLS relays stayed with the old agent, which cut
		// them when its drain ran out: an upgrade ended every HTTPS
		// connection that outlived the drain.
		data := make([]byte, 20<<20)
		rand.Read(data)
		if err := os.WriteFile(filepath.Join(c.WWW("be2"), "big.bin"), data, 0o644); err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(c.Dir, "tls-upgrade.download")
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		// 5 MB/s: 20 MB last about four seconds, past the drain.
		dl := c.Exec(ctx, "client", "curl", "-sS", "-k", "--limit-rate", "5M", "--resolve", "b.example:443:"+cluster.VIP,
			"-o", dst, "https://b.example/big.bin")
		var stderr strings.Builder
		dl.Stderr = &stderr
		if err := dl.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(500 * time.Millisecond)
		before := c.AgentPID("be2")
		if err := c.UpgradeAgent("be2", true); err != nil {
			t.Fatal(err)
		}
		if after := c.AgentPID("be2"); after == before {
			t.Errorf("be2's agent pid %d after the upgrade, was %d", after, before)
		}
		if n, line := lastLog(t, c, "be2", "relayed connections handed over", "sessions"); n == "" || n == "0" || n == "1" {
			t.Errorf("the old BE handed over %q sessions, want the TLS download and the idle TLS connection: %s", n, line)
		}
		if err := dl.Wait(); err != nil {
			t.Errorf("the TLS download across the BE's upgrade: %v: %s", err, stderr.String())
		} else if got, _ := os.ReadFile(dst); md5.Sum(got) != md5.Sum(data) {
			t.Errorf("the TLS download across the BE's upgrade differs: %d bytes, want %d", len(got), len(data))
		}
		if got := conn.get(t, "/index.html?after-be-upgrade"); got != "200 be2" {
			t.Errorf("the idle TLS connection after the BE's upgrade: %q", got)
		}
	})
}

// Two ports, one flow key (docs/design.md): a client whose source port
// already has a handed-off HTTP connection opens the TLS port from the
// same port. The new connection is routed and served by its own rule; the
// older one may be lost, as documented, and the FE goes on serving.
func TestTLSSameSourcePort(t *testing.T) {
	c := tlsCluster(t, false)
	const port = 41234
	plain, err := c.Dial(context.Background(), "client", port, fmt.Sprintf("%s:%d", cluster.VIP, cluster.Port))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	k := &keepAlive{conn: plain, br: bufio.NewReader(plain)}
	if got, err := k.getAs("a.example", "/index.html"); err != nil || got != "200 be1" {
		t.Fatalf("HTTP from port %d: %q %v", port, got, err)
	}
	conn := tlsKeepAliveFrom(t, c, "b.example", port)
	defer conn.Close()
	if got := conn.get(t, "/index.html"); got != "200 be2" {
		t.Errorf("TLS from the same port %d: %q, want 200 be2", port, got)
	}
	start := time.Now()
	got, err := k.getAs("a.example", "/index.html")
	t.Logf("the HTTP connection from the same port afterwards: %q %v after %v", got, err, time.Since(start))
	t.Log(c.Grep("fe", "41234"))
	if got := curlTLS(t, c, "a.example", "/index.html"); got != "200 be1" {
		t.Errorf("another client connection afterwards: %q", got)
	}
}

// tlsConn is a keep-alive HTTP/1.1 connection over TLS through the VIP.
type tlsConn struct {
	*tls.Conn
	br   *bufio.Reader
	name string
}

func tlsKeepAlive(t *testing.T, c *cluster.Cluster, name string) *tlsConn {
	return tlsKeepAliveFrom(t, c, name, 0)
}

func tlsKeepAliveFrom(t *testing.T, c *cluster.Cluster, name string, port int) *tlsConn {
	t.Helper()
	raw, err := c.Dial(context.Background(), "client", port, cluster.VIP+":443")
	if err != nil {
		t.Fatal(err)
	}
	conn := tls.Client(raw, &tls.Config{ServerName: name, InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}})
	return &tlsConn{Conn: conn, br: bufio.NewReader(conn), name: name}
}

// get sends one request and returns the status and X-Served-By, or the
// error.
func (k *tlsConn) get(t *testing.T, path string) string {
	t.Helper()
	k.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(k, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, k.name)
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return fmt.Sprintf("%d %s", resp.StatusCode, resp.Header.Get("X-Served-By"))
}
