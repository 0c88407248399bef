package tests

import (
	"bufio"
	"context"
	"crypto/md5"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
)

// Later requests of a keep-alive connection that the rules give another BE
// (issue 7). phttp = multi (TCPHA 0.3): the BE holding the connection gives
// it back to the FE, which moves it to the right BE. phttp = forward (Aron
// et al.'s back-end forwarding): the BE fetches the request from the other
// BE's web server and relays the answer. Both must look the same to a
// client.

func phttpCluster(t *testing.T, mode string) *cluster.Cluster {
	t.Helper()
	return phttpClusterRules(t, mode, `rule = be2 \.jpg$`, `rule = be1 .*`)
}

// phttpClusterRules is phttpCluster with other rules.
func phttpClusterRules(t *testing.T, mode string, rules ...string) *cluster.Cluster {
	t.Helper()
	// "multi, accept = be": phttp = multi with [fe] accept = be.
	// "multi, deliver = socket": phttp = multi with [be] deliver = socket.
	mode, accept, _ := strings.Cut(mode, ", ")
	extra, beExtra := "phttp = "+mode+"\ntimewait = 2\ndtcinterval = 1\n", ""
	switch {
	case strings.HasPrefix(accept, "deliver"):
		beExtra = accept + "\n"
	case accept != "":
		extra += accept + "\n"
	}
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", PublicWWW: true, Rules: rules,
		FEExtra: extra, BEExtra: beExtra})
	// Both BEs have the FE's rules before the first request.
	deadline := time.Now().Add(10 * time.Second)
	for _, b := range c.BEs {
		for c.Grep(b.Name, `msg="cluster rules from the FE"`) == "" {
			if time.Now().After(deadline) {
				t.Fatalf("%s got no cluster frame:\n%s", b.Name, c.Grep(b.Name, "cluster"))
			}
			time.Sleep(50 * time.Millisecond)
		}
		// deliver = socket: the BE's packet path holds its queue.
		for strings.Contains(beExtra, "socket") && c.Grep(b.Name, "later requests read from NFQUEUE") == "" {
			if time.Now().After(deadline) {
				t.Fatalf("%s did not bind its queue", b.Name)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return c
}

// getBody is keepAlive.get that also returns the body's MD5.
func (k *keepAlive) getBody(path string) (string, [16]byte, error) {
	k.conn.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(k.conn, "GET %s HTTP/1.1\r\nHost: tcpha\r\n\r\n", path)
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return "", [16]byte{}, err
	}
	defer resp.Body.Close()
	h := md5.New()
	if _, err := io.Copy(h, resp.Body); err != nil {
		return "", [16]byte{}, err
	}
	return fmt.Sprintf("%d %s", resp.StatusCode, resp.Header.Get("X-Served-By")), [16]byte(h.Sum(nil)), nil
}

// moves is how many connections the BEs moved, and failed to move,
// although their request was another BE's.
func moves(t *testing.T, c *cluster.Cluster) (moved, notMoved int) {
	t.Helper()
	for _, b := range c.BEs {
		moved += statusOf(t, c, b.Name, "moved")
		notMoved += statusOf(t, c, b.Name, "not_moved")
	}
	return moved, notMoved
}

// checkMoves checks, under phttp = multi, that want more connections moved
// and none failed to since before. With accept = be, up to landed more
// moved: connections whose first request landed on the other BE.
func checkMoves(t *testing.T, c *cluster.Cluster, multi bool, before, want, landed int) int {
	t.Helper()
	moved, notMoved := moves(t, c)
	// The FE carried out every move the BEs asked for.
	if fe, feNot := statusOf(t, c, "fe", "moved"), statusOf(t, c, "fe", "not_moved"); fe != moved || feNot != notMoved {
		t.Errorf("the FE moved %d and did not move %d; the BEs say %d and %d", fe, feNot, moved, notMoved)
	}
	if multi && (moved-before < want || moved-before > want+landed || notMoved != 0) {
		t.Errorf("%d connections moved, %d not moved; want %d moved", moved-before, notMoved, want)
		for _, h := range []string{"fe", "be1", "be2"} {
			for _, s := range []string{"not moved", "reset", "refused", "not taken", "level=WARN", "level=ERROR"} {
				t.Log(c.Grep(h, s))
			}
		}
	}
	if !multi && moved != 0 {
		t.Errorf("%d connections moved under phttp = forward", moved)
	}
	return moved
}

// TestPHTTP runs in both accept modes (issue 14): with accept = be the
// BEs accept and route the first requests too.
func TestPHTTP(t *testing.T) {
	for _, mode := range []string{"multi", "forward", "multi, accept = be", "multi, deliver = socket"} {
		t.Run(mode, func(t *testing.T) { testPHTTP(t, mode) })
	}
}

func testPHTTP(t *testing.T, mode string) {
	c := phttpCluster(t, mode)
	multi := strings.HasPrefix(mode, "multi")
	// The connections whose first request may land on the other BE.
	landing := func(n int) int {
		if strings.HasSuffix(mode, "accept = be") {
			return n
		}
		return 0
	}

	t.Run("one keep-alive connection, alternating BEs", func(t *testing.T) {
		args := []string{"curl", "-sS", "-w", "%{num_connects} %{http_code} %header{x-served-by}\n"}
		for _, p := range []string{"/index.html", "/img/a.jpg", "/index.html", "/img/a.jpg"} {
			args = append(args, "-o", "/dev/null", url+p)
		}
		out, err := c.Output(context.Background(), "client", args...)
		if err != nil {
			t.Fatal(err)
		}
		want := "1 200 be1\n0 200 be2\n0 200 be1\n0 200 be2\n"
		if out != want {
			t.Errorf("curl (new connections, status, served by):\n%s\nwant:\n%s", out, want)
		}
		checkMoves(t, c, multi, 0, 3, landing(1))
	})

	t.Run("20 MB bodies after switching and back", func(t *testing.T) {
		big := make([]byte, 20<<20)
		rand.Read(big)
		os.WriteFile(filepath.Join(c.WWW("be2"), "img", "big.jpg"), big, 0o644)
		os.WriteFile(filepath.Join(c.WWW("be1"), "big.bin"), big, 0o644)
		sum := md5.Sum(big)
		before, _ := moves(t, c)
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		for _, p := range []string{"/index.html", "/img/big.jpg", "/big.bin", "/img/big.jpg"} {
			who, got, err := k.getBody(p)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			if strings.HasPrefix(p, "/img/big") || p == "/big.bin" {
				if got != sum {
					t.Errorf("%s (%s): the body differs", p, who)
				}
			}
			t.Logf("%s: %s", p, who)
		}
		checkMoves(t, c, multi, before, 3, landing(1))
	})

	t.Run("pipelined requests for be1, be2, be1", func(t *testing.T) {
		conn, err := c.Dial(context.Background(), "client", 0, fmt.Sprintf("%s:%d", cluster.VIP, cluster.Port))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		var req strings.Builder
		for _, p := range []string{"/index.html", "/img/a.jpg", "/index.html"} {
			fmt.Fprintf(&req, "GET %s HTTP/1.1\r\nHost: tcpha\r\n\r\n", p)
		}
		before, _ := moves(t, c)
		io.WriteString(conn, req.String()) // all three in one write
		br := bufio.NewReader(conn)
		var got []string
		for range 3 {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			got = append(got, resp.Header.Get("X-Served-By")+":"+strings.TrimSpace(string(b)))
		}
		want := []string{"be1:index from be1", "be2:jpeg from be2", "be1:index from be1"}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("pipelined answers %v, want %v", got, want)
		}
		checkMoves(t, c, multi, before, 2, landing(1))
	})

	t.Run("50 connections × 20 alternating requests, no reset", func(t *testing.T) {
		before, _ := moves(t, c)
		cp := startCapture(t, c, "client", "tcp[tcpflags] & tcp-rst != 0")
		var wg sync.WaitGroup
		errs := make(chan string, 50*20)
		for range 50 {
			wg.Go(func() {
				k := dialKeepAlive(t, c)
				defer k.conn.Close()
				for i := range 20 {
					p, want := "/index.html", "200 be1"
					if i%2 == 1 {
						p, want = "/img/a.jpg", "200 be2"
					}
					if got, err := k.get(p); err != nil || got != want {
						errs <- fmt.Sprintf("%s: %q %v", p, got, err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for e := range errs {
			t.Error(e)
		}
		if n := cp.stop(t); n != 0 {
			t.Errorf("%d RSTs on the client's link", n)
			out, _ := exec.Command("tcpdump", "-r", cp.file, "-nn", "-e", "-c", "10").CombinedOutput()
			t.Logf("the first of them:\n%s", out)
			for _, h := range []string{"fe", "be1", "be2"} {
				mac, _ := c.Output(context.Background(), h, "cat", "/sys/class/net/eth0/address")
				t.Logf("%s: %s%s", h, mac, c.Grep(h, "cleared"))
			}
		}
		checkMoves(t, c, multi, before, 50*19, landing(50))
		// tcphactl conns ends empty on every host (the FE's after its
		// TIME_WAIT of 2 s).
		deadline := time.Now().Add(2*time.Second + 5*time.Second)
		for {
			table, kernel := flowsOf(t, c)
			busy := ""
			for _, b := range c.BEs {
				if out := ctl(t, c, b.Name, "conns"); strings.Count(out, "\n") > 1 {
					busy += b.Name + ":\n" + out
				}
			}
			if len(table) == 0 && len(kernel) == 0 && busy == "" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the FE still has %d rows, %d flows; BEs' connections:\n%s", len(table), len(kernel), busy)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})

	t.Run("a restarted BE has the rules with its first session", func(t *testing.T) {
		before := strings.Count(c.Grep("be1", `msg="cluster rules from the FE"`), "\n")
		if err := c.StopAgent("be1", syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := c.StartAgent("be1"); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for strings.Count(c.Grep("be1", `msg="cluster rules from the FE"`), "\n") == before {
			if time.Now().After(deadline) {
				t.Fatal("the restarted be1 got no cluster frame within 5 s")
			}
			time.Sleep(20 * time.Millisecond)
		}
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		for _, tc := range [][2]string{{"/index.html", "200 be1"}, {"/img/a.jpg", "200 be2"}} {
			if got, err := k.get(tc[0]); err != nil || got != tc[1] {
				t.Errorf("%s after be1's restart: %q %v", tc[0], got, err)
			}
		}
	})

	t.Run("the other BE down: an answer, and the connection goes on", func(t *testing.T) {
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
			t.Fatalf("first: %q %v", got, err)
		}
		if err := c.StopWWW("be2"); err != nil {
			t.Fatal(err)
		}
		defer c.StartWWW("be2")
		start := time.Now()
		got, err := k.get("/img/a.jpg")
		t.Logf("with be2's web server down: %q %v after %v", got, err, time.Since(start).Round(time.Millisecond))
		if err != nil || time.Since(start) > 5*time.Second || (got != "200 be1" && !strings.HasPrefix(got, "503")) {
			t.Errorf("the request for be2's content: %q %v", got, err)
		}
		if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
			t.Errorf("the connection afterwards: %q %v", got, err)
		}
	})

	t.Run("the other BE's agent down: an answer, and the connection goes on", func(t *testing.T) {
		k := dialKeepAlive(t, c)
		defer k.conn.Close()
		if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
			t.Fatalf("first: %q %v", got, err)
		}
		if err := c.StopAgent("be2", syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		defer c.StartAgent("be2")
		start := time.Now()
		got, err := k.get("/img/a.jpg")
		t.Logf("with be2's agent down: %q %v after %v", got, err, time.Since(start).Round(time.Millisecond))
		if err != nil || time.Since(start) > 5*time.Second || !strings.HasPrefix(got, "200 ") && !strings.HasPrefix(got, "503") {
			t.Errorf("the request for be2's content: %q %v", got, err)
		}
		if got, err := k.get("/index.html"); err != nil || got != "200 be1" {
			t.Errorf("the connection afterwards: %q %v", got, err)
		}
	})

	// Issue 19: be1's agent stopped while its nginx ran; on one
	// connection, /img/a.jpg (be2), then /index.html (be1's rule only) was
	// answered 200 by be2 with be2's own index, while a new connection got
	// 503. be2 must fetch it from be1's nginx (back-end forwarding) or
	// answer 503; never serve it itself.
	t.Run("be1's agent down, its nginx up: its content never from be2", func(t *testing.T) {
		before := strings.Count(c.Grep("be2", `msg="cluster rules from the FE"`), "\n")
		if err := c.StopAgent("be1", syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		defer c.StartAgent("be1")
		// be2 has the FE's word that be1 takes no connections.
		deadline := time.Now().Add(10 * time.Second)
		for strings.Count(c.Grep("be2", `msg="cluster rules from the FE"`), "\n") == before {
			if time.Now().After(deadline) {
				t.Fatal("be2 got no cluster frame without be1 within 10 s")
			}
			time.Sleep(20 * time.Millisecond)
		}
		out, err := c.Output(context.Background(), "client", "curl", "-sS", "-w", "|%{num_connects} %{http_code} %header{x-served-by}\n",
			"-o", "/dev/null", url+"/img/a.jpg", url+"/index.html")
		if err != nil {
			t.Fatal(err)
		}
		first, second, _ := strings.Cut(out, "\n")
		t.Logf("curl on one connection: %q then %q", first, second)
		if first != "|1 200 be2" {
			t.Fatalf("/img/a.jpg: %q, want be2's on a new connection", first)
		}
		if second != "index from be1\n|0 200 be1\n" && !strings.Contains(second, "|0 503 ") {
			t.Errorf("/index.html on be2's connection: %q, want be1's index (from be1's nginx) or 503", second)
		}
		// With accept = fe the FE has no BE for it: 503. With accept = be
		// the connection lands on be2, which fetches it from be1's nginx.
		want := "503"
		if landing(1) > 0 {
			want = "200 be1"
		}
		if got, err := c.Output(context.Background(), "client", "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}%header{x-served-by}", url+"/index.html"); err != nil || strings.Replace(got, "200be1", "200 be1", 1) != want {
			t.Errorf("a new connection for /index.html: %q %v, want %s", got, err, want)
		}
	})
}

// A reload's rules reach the BEs: they route later requests by them.
func TestPHTTPReload(t *testing.T) {
	c := phttpCluster(t, "multi")
	conf := c.ConfigFile("fe")
	b, _ := os.ReadFile(conf)
	// .jpg to be1 now, the rest to be2.
	text := strings.Replace(string(b), "rule = "+c.BEs[1].IP+` \.jpg$`, "rule = "+c.BEs[0].IP+` \.jpg$`, 1)
	text = strings.Replace(text, "rule = "+c.BEs[0].IP+" .*", "rule = "+c.BEs[1].IP+" .*", 1)
	os.WriteFile(conf, []byte(text), 0o640)
	if out := ctl(t, c, "fe", "reload"); !strings.Contains(out, "reloaded") {
		t.Fatal(out)
	}
	deadline := time.Now().Add(10 * time.Second)
	for strings.Count(c.Grep("be2", `msg="cluster rules from the FE"`), "\n") < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("be2 did not get the new rules:\n%s", c.Grep("be2", "cluster"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	k := dialKeepAlive(t, c)
	defer k.conn.Close()
	for _, tc := range [][2]string{{"/index.html", "200 be2"}, {"/img/a.jpg", "200 be1"}, {"/index.html", "200 be2"}} {
		if got, err := k.get(tc[0]); err != nil || got != tc[1] {
			t.Errorf("%s after the reload: %q %v, want %s", tc[0], got, err, tc[1])
		}
	}
}

// phttp = single keeps TCPHA 0.2's behaviour: every request of a
// connection goes where its first went.
func TestPHTTPSingle(t *testing.T) {
	c := newCluster(t, cluster.Options{BEs: 2, Secret: "test-cluster-secret", PublicWWW: true,
		Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}, FEExtra: "phttp = single\n"})
	k := dialKeepAlive(t, c)
	defer k.conn.Close()
	for _, p := range []string{"/index.html", "/img/a.jpg"} {
		if got, err := k.get(p); err != nil || got != "200 be1" {
			t.Errorf("%s: %q %v, want be1 (the connection's first BE)", p, got, err)
		}
	}
}

// A BE that crashes while connections move costs only the connections it
// held or was taking, and those end at once (a FIN or RST from its kernel)
// rather than wait for an answer that never comes; the others go on,
// answered by the right BE or the fallback rule's. The rows of the cut
// connections stay in the FE's table until idletimeout: the RST reached
// the client directly, and the client sends nothing after it.
func TestPHTTPBECrash(t *testing.T) {
	c := phttpCluster(t, "multi")
	const clients, rounds = 20, 200
	var wg sync.WaitGroup
	var survived, cut, answered atomic.Int32
	for range clients {
		wg.Go(func() {
			k := dialKeepAlive(t, c)
			defer k.conn.Close()
			for i := range rounds {
				p, want := "/index.html", []string{"200 be1"}
				if i%2 == 1 {
					p, want = "/img/a.jpg", []string{"200 be2", "200 be1"}
				}
				got, err := k.get(p)
				var ne net.Error
				switch {
				case errors.As(err, &ne) && ne.Timeout():
					t.Errorf("%s: no answer within 10 s: the connection hangs", p)
					return
				case err != nil:
					cut.Add(1) // it was be2's when be2 died
					return
				case !slices.Contains(want, got):
					t.Errorf("%s: %q, want one of %q", p, got, want)
					return
				}
				answered.Add(1)
			}
			survived.Add(1)
		})
	}
	// Under load: once every client is past its first moves, so that the
	// connections are spread over both BEs. A fixed 200 ms found all 20
	// still on their first move to be2 on a busy machine, and none could
	// survive.
	deadline := time.Now().Add(10 * time.Second)
	for answered.Load() < 6*clients && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if err := c.StopAgent("be2", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	t.Logf("be2's agent killed under load: %d connections went on, %d were cut", survived.Load(), cut.Load())
	if survived.Load() == 0 {
		t.Error("no connection survived the other BE's crash")
	}
}
