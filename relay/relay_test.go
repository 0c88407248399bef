package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"tcpha/handoff/conntab"
	"tcpha/internal/testnet"
	"testing"
	"time"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// webServer is the BE's local web server: Go's net/http, which speaks
// keep-alive, chunked, HEAD, 204/304 and 100-continue as servers do.
type webServer struct {
	addr    string
	conns   atomic.Int64 // connections accepted
	srv     *http.Server
	big     []byte
	lastReq atomic.Value // the last request's Connection header
}

func newWebServer(t *testing.T) *webServer {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	w := &webServer{addr: ln.Addr().String(), big: make([]byte, 5<<20)}
	rand.Read(w.big)
	mux := http.NewServeMux()
	mux.HandleFunc("/small", func(rw http.ResponseWriter, r *http.Request) {
		w.lastReq.Store(r.Header.Get("Connection") + "|" + strconv.FormatBool(r.Close))
		rw.Header().Set("Content-Length", "5")
		io.WriteString(rw, "small")
	})
	mux.HandleFunc("/chunked", func(rw http.ResponseWriter, r *http.Request) {
		rw.Header().Set("Trailer", "X-Sum")
		for i := range 5 {
			fmt.Fprintf(rw, "part%d;", i)
			rw.(http.Flusher).Flush()
		}
		rw.Header().Set("X-Sum", "done")
	})
	mux.HandleFunc("/big", func(rw http.ResponseWriter, r *http.Request) {
		rw.Header().Set("Content-Length", strconv.Itoa(len(w.big)))
		rw.Write(w.big)
	})
	mux.HandleFunc("/nocontent", func(rw http.ResponseWriter, r *http.Request) { rw.WriteHeader(204) })
	mux.HandleFunc("/notmodified", func(rw http.ResponseWriter, r *http.Request) { rw.WriteHeader(304) })
	mux.HandleFunc("/echo", func(rw http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		rw.Header().Set("X-Len", strconv.Itoa(len(b)))
		rw.Write(b)
	})
	w.srv = &http.Server{Handler: mux, ConnState: func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			w.conns.Add(1)
		}
	}}
	go w.srv.Serve(ln)
	t.Cleanup(func() { w.srv.Close() })
	return w
}

func dialer(addr string) func(ctx context.Context) (*net.TCPConn, error) {
	return func(ctx context.Context) (*net.TCPConn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp4", addr)
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
}

func newRelay(t *testing.T, addr string) *Relay {
	p := &Pool{Dial: dialer(addr)}
	t.Cleanup(p.Close)
	r := New(Config{Pool: p, MaxHeader: 4096, HeadTimeout: 500 * time.Millisecond, IdleTimeout: 2 * time.Second, Log: quiet()})
	t.Cleanup(r.Wait)
	return r
}

// connect returns the client end of a connection whose server end the
// relay serves, as a handed-off connection would be.
func connect(t *testing.T, r *Relay) net.Conn {
	t.Helper()
	c, s := testnet.Accepted(t)
	r.Serve(s, nil)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

func get(t *testing.T, c net.Conn, br *bufio.Reader, method, path string, hdr ...string) *http.Response {
	t.Helper()
	fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: be\r\n%s\r\n", method, path, strings.Join(append(hdr, ""), "\r\n"))
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp
}

func body(t *testing.T, resp *http.Response) string {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("body: %v", err)
	}
	return string(b)
}

// One keep-alive connection, every framing a response can have.
func TestKeepAliveFramings(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	c := connect(t, r)
	br := bufio.NewReader(c)
	for i := range 2 {
		if b := body(t, get(t, c, br, "GET", "/small")); b != "small" {
			t.Errorf("small: %q", b)
		}
		resp := get(t, c, br, "GET", "/chunked")
		if b := body(t, resp); b != "part0;part1;part2;part3;part4;" || resp.Trailer.Get("X-Sum") != "done" {
			t.Errorf("chunked: %q trailer %q", b, resp.Trailer.Get("X-Sum"))
		}
		if resp := get(t, c, br, "HEAD", "/big"); resp.ContentLength != int64(len(w.big)) || body(t, resp) != "" {
			t.Errorf("HEAD: length %d", resp.ContentLength)
		}
		if resp := get(t, c, br, "GET", "/nocontent"); resp.StatusCode != 204 {
			t.Errorf("204: %d", resp.StatusCode)
		}
		if resp := get(t, c, br, "GET", "/notmodified"); resp.StatusCode != 304 {
			t.Errorf("304: %d", resp.StatusCode)
		}
		if b := body(t, get(t, c, br, "GET", "/big")); b != string(w.big) {
			t.Errorf("big (round %d): %d bytes, different", i, len(b))
		}
	}
	if n := w.conns.Load(); n != 1 {
		t.Errorf("the web server saw %d connections for one client connection", n)
	}
}

// `Connection: close` clients: each gets its answer with Connection: close
// and an EOF, while the upstream connections are reused.
func TestConnectionCloseReusesUpstream(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	for i := range 20 {
		c := connect(t, r)
		br := bufio.NewReader(c)
		resp := get(t, c, br, "GET", "/small", "Connection: close")
		if b := body(t, resp); b != "small" || !resp.Close {
			t.Fatalf("request %d: %q close=%v", i, b, resp.Close)
		}
		if _, err := br.ReadByte(); err != io.EOF {
			t.Fatalf("request %d: after the response: %v, want EOF", i, err)
		}
		c.Close()
	}
	if n := w.conns.Load(); n > 2 {
		t.Errorf("20 one-request clients cost the web server %d connections", n)
	}
	if got := w.lastReq.Load().(string); got != "|false" {
		t.Errorf("the web server saw Connection %q: the hop-by-hop close should not reach it", got)
	}
	// HTTP/1.0 without keep-alive: passed as is, and closed.
	c := connect(t, r)
	fmt.Fprintf(c, "GET /small HTTP/1.0\r\n\r\n")
	b, _ := io.ReadAll(c)
	if !bytes.HasSuffix(b, []byte("small")) || !bytes.HasPrefix(b, []byte("HTTP/1.0 200")) {
		t.Errorf("HTTP/1.0: %q", b)
	}
}

func TestPipelined(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	c := connect(t, r)
	fmt.Fprint(c, "GET /small HTTP/1.1\r\nHost: x\r\n\r\nGET /chunked HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	br := bufio.NewReader(c)
	want := []string{"small", "part0;part1;part2;part3;part4;", "abc", "small"}
	for i, w := range want {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("response %d: %v", i, err)
		}
		if b := body(t, resp); b != w {
			t.Errorf("response %d: %q, want %q", i, b, w)
		}
	}
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("after the close: %v", err)
	}
}

// RFC 9112 section 2.2: empty lines before a keep-alive client's next
// request (one after a POST body, as old clients send) are ignored, and
// not passed on: Go's net/http, the web server here, tolerates only four
// bytes of them.
func TestEmptyLinesBeforeRequests(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	c := connect(t, r)
	br := bufio.NewReader(c)
	fmt.Fprint(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\r\n")
	if resp, err := http.ReadResponse(br, nil); err != nil || body(t, resp) != "abc" {
		t.Fatalf("POST: %v %v", resp, err)
	}
	// Quiet for longer than the head timeout: an idle connection, not a
	// slow request.
	time.Sleep(r.cfg.HeadTimeout + 300*time.Millisecond)
	if b := body(t, get(t, c, br, "GET", "/small")); b != "small" {
		t.Errorf("after a CRLF: %q", b)
	}
	fmt.Fprint(c, "\r\n\n\r\n\nGET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 || body(t, resp) != "small" || !resp.Close {
		t.Fatalf("after four empty lines, with Connection: close: %v %v", resp, err)
	}
	if got := w.lastReq.Load().(string); got != "|false" {
		t.Errorf("the web server saw Connection %q", got)
	}
	if w.conns.Load() != 1 {
		t.Errorf("the web server saw %d connections, want 1", w.conns.Load())
	}
}

func TestRequestBodies(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	c := connect(t, r)
	br := bufio.NewReader(c)
	for _, n := range []int{10, 20 << 10, 1 << 20} { // buffered, read and written, spliced
		data := bytes.Repeat([]byte("x"), n)
		go func() {
			fmt.Fprintf(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", n)
			c.Write(data)
		}()
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		if b := body(t, resp); b != string(data) {
			t.Errorf("%d-byte body echoed as %d bytes", n, len(b))
		}
	}
	// Chunked, in pieces.
	go func() {
		fmt.Fprint(c, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
		time.Sleep(20 * time.Millisecond)
		fmt.Fprint(c, "lo\r\n6\r\n world\r\n0\r\n\r\n")
	}()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b := body(t, resp); b != "hello world" {
		t.Errorf("chunked body: %q", b)
	}
	// Expect: 100-continue: the client sends its body only after the 100.
	fmt.Fprint(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
	resp, err = http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 100 {
		t.Fatalf("expected 100 Continue first: %v %v", resp, err)
	}
	c.Write([]byte("body"))
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b := body(t, resp); b != "body" {
		t.Errorf("after 100-continue: %q", b)
	}
}

// waitIdle waits until p holds n idle connections: a session returns its
// upstream connection to the pool only after its client has the response,
// and a next client can come first.
func waitIdle(t *testing.T, p *Pool, n int) {
	t.Helper()
	for deadline := time.Now().Add(2 * time.Second); p.Stats().Idle != n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the pool holds %d idle connections, want %d", p.Stats().Idle, n)
		}
	}
}

// rawServer answers every request on a connection with reply(n), n the
// request's number on its connection, and closes after max requests, or,
// with lazy, when a request after those comes.
func rawServer(t *testing.T, max int, lazy bool, reply func(n int) string) (string, *atomic.Int64) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var conns atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for n := 0; n < max; n++ {
					if _, err := http.ReadRequest(br); err != nil {
						return
					}
					if _, err := io.WriteString(c, reply(n)); err != nil {
						return
					}
				}
				if lazy {
					http.ReadRequest(br)
				}
			}()
		}
	}()
	return ln.Addr().String(), &conns
}

// A server that answers once per connection and then closes it. When the
// close comes before the next client (closed), the pool finds the idle
// connection closed and dials a new one instead of sending the request into
// it. When it comes only with the next request (lazy), the pooled
// connection looked alive when taken, and the GET is sent again on a new
// one (a retry). Either way the clients notice nothing.
func TestUpstreamClosedBetweenRequests(t *testing.T) {
	for _, lazy := range []bool{false, true} {
		t.Run(fmt.Sprintf("lazy=%v", lazy), func(t *testing.T) {
			addr, conns := rawServer(t, 1, lazy, func(int) string { return "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" })
			r := newRelay(t, addr)
			for i := range 3 {
				c := connect(t, r)
				br := bufio.NewReader(c)
				if b := body(t, get(t, c, br, "GET", "/")); b != "ok" {
					t.Fatalf("request %d: %q", i, b)
				}
				waitIdle(t, r.cfg.Pool, 1)
				if !lazy {
					time.Sleep(20 * time.Millisecond) // the server's close arrives
				}
			}
			st := r.Stats()
			retries, reuses := int64(0), int64(0)
			if lazy {
				retries, reuses = 2, 2
			}
			if st.Retries != retries || st.Upstream.Reuses != reuses || conns.Load() != 3 {
				t.Errorf("retries %d, reuses %d, server connections %d; want %d, %d, 3", st.Retries, st.Upstream.Reuses, conns.Load(), retries, reuses)
			}
		})
	}
}

func TestCloseDelimitedResponse(t *testing.T) {
	addr, _ := rawServer(t, 1, false, func(int) string { return "HTTP/1.1 200 OK\r\n\r\nuntil the end" })
	r := newRelay(t, addr)
	c := connect(t, r)
	fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	b, err := io.ReadAll(c)
	if err != nil || !bytes.HasSuffix(b, []byte("\r\n\r\nuntil the end")) {
		t.Errorf("%q %v", b, err)
	}
}

func TestUpgradeTunnel(t *testing.T) {
	ln, _ := net.Listen("tcp4", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		http.ReadRequest(br)
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		io.Copy(c, br) // echo
	}()
	r := newRelay(t, ln.Addr().String())
	c := connect(t, r)
	br := bufio.NewReader(c)
	resp := get(t, c, br, "GET", "/ws", "Connection: Upgrade", "Upgrade: echo")
	if resp.StatusCode != 101 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	c.Write([]byte("ping"))
	b := make([]byte, 4)
	if _, err := io.ReadFull(br, b); err != nil || string(b) != "ping" {
		t.Errorf("tunnel echo: %q %v", b, err)
	}
}

// Bad requests get their answer and a close, never a RST that would
// destroy the answer: a malformed head 400, an oversized one (written in
// one piece) 431, a head that stalls 408; a web server that is down 502.
func TestRefusals(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	for _, tc := range []struct{ send, want string }{
		{"GARBAGE\r\n\r\n", "HTTP/1.1 400 "},
		{"GET / HTTP/1.1\r\nX-Big: " + strings.Repeat("a", 6000) + "\r\n\r\n", "HTTP/1.1 431 "},
		{"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.1 400 "},
		{"GET / HTTP/1.1\r\nHost: x\r\n", "HTTP/1.1 408 "},
	} {
		c := connect(t, r)
		c.Write([]byte(tc.send))
		b, err := io.ReadAll(c)
		if err != nil || !bytes.HasPrefix(b, []byte(tc.want)) {
			t.Errorf("%.20q: got %.40q, %v; want %q and a clean close", tc.send, b, err, tc.want)
		}
	}
	down := newRelay(t, "127.0.0.1:1")
	c := connect(t, down)
	fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	if b, _ := io.ReadAll(c); !bytes.HasPrefix(b, []byte("HTTP/1.1 502 ")) {
		t.Errorf("web server down: %.40q", b)
	}
}

// A client idle past IdleTimeout is closed cleanly; one that closes is
// noticed at once.
func TestIdle(t *testing.T) {
	w := newWebServer(t)
	p := &Pool{Dial: dialer(w.addr)}
	defer p.Close()
	r := New(Config{Pool: p, IdleTimeout: 200 * time.Millisecond, Log: quiet()})
	c := connect(t, r)
	br := bufio.NewReader(c)
	body(t, get(t, c, br, "GET", "/small"))
	start := time.Now()
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("idle client: %v, want EOF", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("idle close after %v", d)
	}
	c.Close()
	c2 := connect(t, r)
	c2.Close()
	r.Wait()
	if r.Active() != 0 {
		t.Errorf("%d sessions left", r.Active())
	}
}

// phttp = forward: a connection's later requests for another BE's content
// are fetched from that BE's web server over its own pooled connections;
// the first request is always local; an unreachable BE costs that request
// a 503 and the connection goes on.
func TestForward(t *testing.T) {
	local, other := newWebServer(t), newWebServer(t)
	remote := &Pool{Dial: dialer(other.addr)}
	t.Cleanup(remote.Close)
	ln, _ := net.Listen("tcp4", "127.0.0.1:0")
	dead := &Pool{Dial: dialer(ln.Addr().String())}
	ln.Close()
	t.Cleanup(dead.Close)
	r := newRelay(t, local.addr)
	r.cfg.Route = func(_, path string) Rules {
		switch path {
		case "/big":
			return Rules{Usable: []*Pool{remote}}
		case "/echo":
			return Rules{Usable: []*Pool{dead, remote}} // the first BE is down: the next one
		case "/nocontent":
			return Rules{Usable: []*Pool{dead}}
		case "/chunked":
			return Rules{Usable: []*Pool{remote, nil}} // the other BE, then this one
		}
		return Rules{Here: true}
	}
	c := connect(t, r)
	br := bufio.NewReader(c)
	// First request: local even if the rules say otherwise.
	if resp := get(t, c, br, "GET", "/big"); body(t, resp) != string(local.big) {
		t.Fatal("the first request was not served locally")
	}
	for i := range 3 {
		if resp := get(t, c, br, "GET", "/big"); body(t, resp) != string(other.big) {
			t.Fatalf("request %d: not the other BE's body", i)
		}
		if resp := get(t, c, br, "GET", "/small"); body(t, resp) != "small" {
			t.Fatal("local request after a forwarded one")
		}
	}
	if other.conns.Load() != 1 {
		t.Errorf("the other BE's web server got %d connections, want 1 (pooled)", other.conns.Load())
	}
	if resp := get(t, c, br, "GET", "/echo"); resp.StatusCode != 200 {
		t.Errorf("fallback to the next BE: %d", resp.StatusCode)
	} else {
		body(t, resp)
	}
	resp := get(t, c, br, "GET", "/nocontent")
	if resp.StatusCode != 503 {
		t.Errorf("every BE down: %d, want 503", resp.StatusCode)
	}
	body(t, resp)
	if resp := get(t, c, br, "GET", "/small"); body(t, resp) != "small" {
		t.Error("the connection after a 503")
	}
	// The other BE's web server dies with a pooled connection to it: the
	// request goes to the next in line.
	if resp := get(t, c, br, "GET", "/chunked"); resp.StatusCode != 200 {
		t.Fatalf("/chunked: %d", resp.StatusCode)
	} else {
		body(t, resp)
	}
	other.srv.Close()
	if resp := get(t, c, br, "GET", "/chunked"); resp.StatusCode != 200 || !strings.Contains(body(t, resp), "part4") {
		t.Errorf("after the other BE died: %d", resp.StatusCode)
	}
	if resp := get(t, c, br, "GET", "/small"); body(t, resp) != "small" {
		t.Error("the connection after the fallback")
	}
}

// Reset ends a served connection with a RST to its client; a client the
// relay does not serve is reported as such. Conns lists what is served.
func TestResetAndConns(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	c := connect(t, r)
	br := bufio.NewReader(c)
	body(t, get(t, c, br, "GET", "/small"))
	client := netip.MustParseAddrPort(c.LocalAddr().String())
	// The session counts the request once its exchange is over, which may
	// be a moment after the client has the answer.
	deadline := time.Now().Add(2 * time.Second)
	conns := r.Conns()
	for (len(conns) != 1 || conns[0].Busy) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
		conns = r.Conns()
	}
	if len(conns) != 1 || conns[0].Client != client || conns[0].Requests != 1 || conns[0].State != conntab.Established {
		t.Fatalf("Conns: %+v", conns)
	}
	if r.Reset(netip.MustParseAddrPort("127.0.0.1:1")) {
		t.Error("reset a connection the relay does not serve")
	}
	if !r.Reset(client) {
		t.Fatal("Reset did not find the served connection")
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the client read %v, want a reset", err)
	}
}

// fakeMover records what a session asked of it and answers with outcome.
type fakeMover struct {
	mu      sync.Mutex
	calls   []string
	outcome Outcome
	r       *Relay
	states  []string // the session's state as Conns showed it in Acked and Move
}

func (m *fakeMover) Moving() bool { return true }

func (m *fakeMover) note(s string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, s)
	for _, c := range m.r.Conns() {
		m.states = append(m.states, c.State.String())
	}
}

// called returns the calls so far; the session's goroutine adds to them.
func (m *fakeMover) called() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.calls)
}

func (m *fakeMover) Acked(ctx context.Context, c *net.TCPConn) error { m.note("acked"); return nil }

func (m *fakeMover) Move(c *net.TCPConn, pending []byte, _ []netip.Addr) (Outcome, error) {
	m.note(fmt.Sprintf("move %q", pending))
	if m.outcome == Gone {
		c.Close() // the connection is another BE's now
	}
	return m.outcome, nil
}

// phttp = multi in the relay: a later request for another BE moves the
// connection, with the request's bytes, between responses; what the mover
// answers decides who serves it.
func TestMove(t *testing.T) {
	local, other := newWebServer(t), newWebServer(t)
	remote := &Pool{Dial: dialer(other.addr)}
	t.Cleanup(remote.Close)
	for _, tc := range []struct {
		outcome Outcome
		want    string // the body of the moved request, "" for none
	}{{Gone, ""}, {Kept, "other"}, {Local, "local"}} {
		t.Run(fmt.Sprint(tc.outcome), func(t *testing.T) {
			r := newRelay(t, local.addr)
			m := &fakeMover{outcome: tc.outcome, r: r}
			r.cfg.Mover = m
			r.cfg.Route = func(_, path string) Rules {
				if path == "/big" {
					return Rules{Usable: []*Pool{remote}}
				}
				return Rules{Here: true}
			}
			c := connect(t, r)
			br := bufio.NewReader(c)
			// The first request is this BE's whatever the rules say; a
			// later one for this BE does not move.
			if resp := get(t, c, br, "GET", "/big"); body(t, resp) != string(local.big) {
				t.Fatal("the first request was not served here")
			}
			if resp := get(t, c, br, "GET", "/small"); body(t, resp) != "small" {
				t.Fatal("a later request of this BE's")
			}
			if len(m.calls) != 0 {
				t.Fatalf("moved for a request of this BE's: %q", m.calls)
			}
			// Two requests pipelined: both travel with the connection.
			fmt.Fprint(c, "GET /big HTTP/1.1\r\nHost: be\r\n\r\nGET /small HTTP/1.1\r\nHost: be\r\n\r\n")
			if tc.outcome == Gone {
				if _, err := br.ReadByte(); err == nil {
					t.Error("the session answered a request it moved away")
				}
			} else {
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatal(err)
				}
				got := body(t, resp)
				switch {
				case tc.want == "other" && got != string(other.big), tc.want == "local" && got != string(local.big):
					t.Errorf("the request that did not move was served by the wrong BE")
				}
				if resp := get(t, c, br, "GET", "/small"); body(t, resp) != "small" {
					t.Error("the connection after a move that did not happen")
				}
			}
			c.Close()
			r.Wait()
			want := []string{"acked", `move "GET /big HTTP/1.1\r\nHost: be\r\n\r\nGET /small HTTP/1.1\r\nHost: be\r\n\r\n"`}
			if !slices.Equal(m.calls[:2], want) {
				t.Errorf("mover calls %q, want %q", m.calls, want)
			}
			if !slices.Equal(m.states[:2], []string{"WILLHANDOFF", "HANDOFFING"}) {
				t.Errorf("states while moving %q", m.states)
			}
			st := r.Stats()
			if tc.outcome == Gone && st.Moves != 1 || tc.outcome == Kept && st.MoveFailures != 1 {
				t.Errorf("moves %d, failures %d", st.Moves, st.MoveFailures)
			}
		})
	}
}

func (o Outcome) String() string { return [...]string{"kept", "local", "gone"}[o] }

// A later request whose rules name other BEs is never served by this BE's
// web server (issue 19): be1's agent stopped while its web server runs, and
// be2, holding the connection, answered be1's /index.html with its own.
// With no BE named taking connections, the request is fetched from the
// named BE's web server without a move; a move refused, or no web server
// answering, gets 503 and the connection goes on.
func TestLaterRequestOfOtherBEs(t *testing.T) {
	local, other := newWebServer(t), newWebServer(t)
	remote := &Pool{Dial: dialer(other.addr)}
	t.Cleanup(remote.Close)
	ln, _ := net.Listen("tcp4", "127.0.0.1:0")
	dead := &Pool{Dial: dialer(ln.Addr().String())}
	ln.Close()
	t.Cleanup(dead.Close)
	r := newRelay(t, local.addr)
	m := &fakeMover{outcome: Kept, r: r} // every move refused
	r.cfg.Mover = m
	rules := map[string]Rules{
		"/big":         {Named: []*Pool{remote}},                      // its BE out, its web server up
		"/echo":        {Usable: []*Pool{dead}, Named: []*Pool{dead}}, // move refused, web server down
		"/nocontent":   {Named: []*Pool{dead}},                        // its BE out, web server down
		"/chunked":     {},                                            // no BE named (the FE's local rule)
		"/small":       {Here: true},                                  // this BE's
		"/notmodified": {Named: []*Pool{nil, remote}},                 // this BE named, but out
	}
	r.cfg.Route = func(_, path string) Rules { return rules[path] }
	c := connect(t, r)
	br := bufio.NewReader(c)
	if resp := get(t, c, br, "GET", "/small"); body(t, resp) != "small" {
		t.Fatal("first request")
	}
	resp := get(t, c, br, "GET", "/big")
	if got := body(t, resp); resp.StatusCode != 200 || got != string(other.big) {
		t.Errorf("/big, its BE's agent out: %d, from the named BE's web server: %v, from this BE's: %v",
			resp.StatusCode, got == string(other.big), got == string(local.big))
	}
	if calls := m.called(); len(calls) != 0 {
		t.Errorf("a move with no BE to take the connection: %q", calls)
	}
	for _, path := range []string{"/echo", "/nocontent", "/chunked"} {
		resp := get(t, c, br, "GET", path)
		if b := body(t, resp); resp.StatusCode != 503 {
			t.Errorf("%s: %d %q, want 503", path, resp.StatusCode, b)
		}
		if resp.Close {
			t.Errorf("%s: the 503 closes the connection", path)
		}
	}
	if calls := m.called(); len(calls) != 2 {
		t.Errorf("mover calls %q, want one refused move for /echo", calls)
	}
	resp = get(t, c, br, "GET", "/notmodified")
	if body(t, resp); resp.StatusCode != 304 || other.conns.Load() != 1 {
		t.Errorf("/notmodified: %d, the named BE's web server had %d connections", resp.StatusCode, other.conns.Load())
	}
	if resp := get(t, c, br, "GET", "/small"); body(t, resp) != "small" {
		t.Error("the connection afterwards")
	}
	if st := r.Stats(); st.MoveFailures != 1 || st.Moves != 0 {
		t.Errorf("moves %d, failures %d; want 0, 1", st.Moves, st.MoveFailures)
	}
	// A client that closes after this request gets its 503 too, saying so.
	resp = get(t, c, br, "GET", "/nocontent", "Connection: close")
	if body(t, resp); resp.StatusCode != 503 || !resp.Close {
		t.Errorf("/nocontent with Connection: close: %d, close %v; want 503, close", resp.StatusCode, resp.Close)
	}
	if _, err := br.ReadByte(); err == nil {
		t.Error("the connection goes on after Connection: close")
	}
}

// staleServer's first connection answers `answered` requests and then
// closes: when told to (kill), or when the next request comes (lazy). Every
// later connection answers all its requests.
func staleServer(t *testing.T, answered int, lazy bool) (addr string, kill chan struct{}, conns *atomic.Int64) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	kill, conns = make(chan struct{}), new(atomic.Int64)
	answer := func(br *bufio.Reader, c net.Conn) error {
		req, err := http.ReadRequest(br)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, req.Body)
		_, err = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
		return err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			first := conns.Add(1) == 1
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				if !first {
					for answer(br, c) == nil {
					}
					return
				}
				for range answered {
					if answer(br, c) != nil {
						return
					}
				}
				if lazy {
					http.ReadRequest(br) // read, never answered
					return
				}
				<-kill
			}()
		}
	}()
	return ln.Addr().String(), kill, conns
}

// The upstream connection taken when a handoff is accepted (the offer-time
// check: pooled, or dialed then) may be closed by the web server before the
// client's request comes: nginx stopping or restarting. Issue 19: clients
// got 502 from an accepted handoff. The session looks at the connection
// before it uses it, and a request it sent into one that failed before any
// answer goes once more on a new connection: the client gets 200, and the
// retry is counted.
func TestStaleOfferTimeUpstream(t *testing.T) {
	for _, tc := range []struct {
		name         string
		pooled, lazy bool
		method       string
	}{
		{"dialed at the offer, closed before the request", false, false, "GET"},
		{"dialed at the offer, closed as the request comes", false, true, "GET"},
		{"pooled, closed before a POST", true, false, "POST"},
		{"pooled, closed as the request comes", true, true, "GET"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			answered := 0
			if tc.pooled {
				answered = 1
			}
			addr, kill, conns := staleServer(t, answered, tc.lazy)
			r := newRelay(t, addr)
			pool := r.cfg.Pool
			if tc.pooled {
				// An earlier client leaves the connection in the pool.
				c := connect(t, r)
				if b := body(t, get(t, c, bufio.NewReader(c), "GET", "/")); b != "ok" {
					t.Fatalf("earlier client: %q", b)
				}
				waitIdle(t, pool, 1)
			}
			// The offer: the receiver takes the upstream connection.
			first, err := pool.Get(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if !tc.lazy {
				close(kill)
				for deadline := time.Now().Add(2 * time.Second); !closing(first.Conn); time.Sleep(time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatal("the server's close did not arrive")
					}
				}
			}
			// The commit: the session starts with it.
			c, s := testnet.Accepted(t)
			t.Cleanup(func() { c.Close() })
			c.SetDeadline(time.Now().Add(10 * time.Second))
			r.Serve(s, first)
			if tc.method == "POST" {
				fmt.Fprint(c, "POST /form HTTP/1.1\r\nHost: be\r\nContent-Length: 4\r\n\r\nbody")
			} else {
				fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: be\r\n\r\n")
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatal(err)
			}
			if b := body(t, resp); resp.StatusCode != 200 || b != "ok" {
				t.Errorf("%s: %d %q, want 200 through a new connection", tc.method, resp.StatusCode, b)
			}
			if st := r.Stats(); st.Retries != 1 || st.BadGateways != 0 || conns.Load() != 2 {
				t.Errorf("retries %d, bad gateways %d, server connections %d; want 1, 0, 2", st.Retries, st.BadGateways, conns.Load())
			}
		})
	}
}

// Reset ends its own client's session only: the upstream connection that
// session relayed a body from went back to the pool after it, and another
// session may be relaying a response on it when the first one's client is
// reset. Reset used to close that connection too (the kick for a session
// in a body was never cleared), cutting the other client's response short.
func TestResetSparesAnotherSessionsUpstream(t *testing.T) {
	gate := make(chan struct{})
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var conns atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		// The rest of the body comes after the head: the session relays it
		// in its body phase.
		rw.Header().Set("Content-Length", "10")
		io.WriteString(rw, "hello")
		rw.(http.Flusher).Flush()
		if r.URL.Path == "/wait" {
			<-gate
		} else {
			time.Sleep(20 * time.Millisecond)
		}
		io.WriteString(rw, "world")
	}), ConnState: func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}}
	go srv.Serve(ln)
	defer srv.Close()
	r := newRelay(t, ln.Addr().String())
	a := connect(t, r)
	abr := bufio.NewReader(a)
	if b := body(t, get(t, a, abr, "GET", "/")); b != "helloworld" {
		t.Fatalf("a: %q", b)
	}
	waitIdle(t, r.cfg.Pool, 1) // a's upstream connection
	b := connect(t, r)
	bbr := bufio.NewReader(b)
	fmt.Fprint(b, "GET /wait HTTP/1.1\r\nHost: be\r\n\r\n")
	resp, err := http.ReadResponse(bbr, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !r.Reset(netip.MustParseAddrPort(a.LocalAddr().String())) {
		t.Fatal("Reset did not find a's session")
	}
	close(gate)
	if got, err := io.ReadAll(resp.Body); string(got) != "helloworld" || err != nil {
		t.Errorf("b's response, with a reset meanwhile: %q %v", got, err)
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("the web server saw %d connections, want 1 (b reused a's)", n)
	}
}

// A request body large enough to be spliced may take longer than the head
// timeout, and than the idle timeout, as long as the client is never quiet
// that long: the rule of the smaller bodies read piece by piece. It used
// to be cut at the head's deadline (HeadTimeout after its first byte).
func TestSlowLargeUpload(t *testing.T) {
	w := newWebServer(t)
	p := &Pool{Dial: dialer(w.addr)}
	t.Cleanup(p.Close)
	r := New(Config{Pool: p, HeadTimeout: 200 * time.Millisecond, IdleTimeout: 400 * time.Millisecond, Log: quiet()})
	t.Cleanup(r.Wait)
	c := connect(t, r)
	br := bufio.NewReader(c)
	n := 4 * spliceMin
	go func() {
		fmt.Fprintf(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", n)
		piece := bytes.Repeat([]byte("x"), n/8)
		for range 8 { // 1.2 s in all
			time.Sleep(150 * time.Millisecond)
			c.Write(piece)
		}
	}()
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b := body(t, resp); len(b) != n {
		t.Errorf("%d bytes echoed, want %d", len(b), n)
	}
}

// A connection this BE accepted itself (accept = be) whose client sends
// nothing gets a 408 after HeadTimeout (requesttimeout), as the FE
// answers one, not a silent close after IdleTimeout (TestCluster's bad
// clients with accept = be waited 75 s for nothing).
func TestAcceptedSilentClient408(t *testing.T) {
	ws := newWebServer(t)
	r := newRelay(t, ws.addr)
	c, s := testnet.Accepted(t)
	t.Cleanup(func() { c.Close() })
	r.ServeAccepted(s, nil)
	start := time.Now()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	got, _ := io.ReadAll(c)
	took := time.Since(start)
	if !strings.HasPrefix(string(got), "HTTP/1.1 408 ") || took < 400*time.Millisecond || took > 1500*time.Millisecond {
		t.Errorf("silent accepted client: %q after %v, want a 408 after HeadTimeout (500 ms)", got, took)
	}
}
