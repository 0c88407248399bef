package frontend

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"tcpha/backends"
	"tcpha/handoff"
	"tcpha/handoff/repair"
	"tcpha/metrics"
)

// fakeMigrator "hands off" by answering the client itself, as a BE would,
// or fails as told.
type fakeMigrator struct {
	fail     error
	migrated atomic.Int64
	kept     atomic.Int64
}

func (m *fakeMigrator) Migrate(_ context.Context, sock handoff.Socket, _ netip.AddrPort, consumed []byte, _ []netip.AddrPort) (netip.AddrPort, error) {
	if m.fail != nil {
		return netip.AddrPort{}, m.fail
	}
	m.migrated.Add(1)
	c := sock.(repair.Socket).Conn
	fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nbe")
	c.Close()
	return netip.MustParseAddrPort("10.0.0.11:666"), nil
}

func (m *fakeMigrator) Keep(context.Context, netip.AddrPort) { m.kept.Add(1) }

type rig struct {
	addr string
	m    *fakeMigrator
	s    *Server
}

func newRig(t *testing.T, cfg Config, route backends.Route) *rig {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &fakeMigrator{}
	s := &Server{Config: cfg, Route: func(backends.Request) backends.Route { return route }, Sender: m,
		Metrics: metrics.New(), Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(ctx, context.Background(), ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return &rig{addr: ln.Addr().String(), m: m, s: s}
}

func toBE() backends.Route {
	return backends.Route{BEs: []netip.AddrPort{netip.MustParseAddrPort("10.0.0.11:666")}}
}

func defaults() Config {
	return Config{MaxClients: 1, MaxHeads: 1000, MaxHeadsPerSource: 100, RequestTimeout: 2 * time.Second, MaxHeader: 4096}
}

// waitFor waits up to 5 s for cond, and fails the test naming what did
// not happen.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after 5 s still waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func request(t *testing.T, addr, raw string) (*http.Response, string, error) {
	t.Helper()
	c, err := net.Dial("tcp4", addr)
	if err != nil {
		return nil, "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		return nil, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return nil, "", err
	}
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

// Connections still sending their heads hold no slot: with maxclients 1
// and fifty slow clients connected, a whole request is handed off at once.
func TestSlowClientsHoldNoSlot(t *testing.T) {
	r := newRig(t, defaults(), toBE())
	for range 50 {
		c, err := net.Dial("tcp4", r.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /slow HTTP/1.1\r\nX-A: ")
	}
	resp, body, err := request(t, r.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	if err != nil || resp.StatusCode != 200 || body != "be" {
		t.Fatalf("a whole request among slow ones: %v %q %v", resp, body, err)
	}
}

// Past the per-address cap a connection is closed at once; the others
// are unaffected.
func TestPerSourceCap(t *testing.T) {
	cfg := defaults()
	cfg.MaxHeadsPerSource = 5
	r := newRig(t, cfg, toBE())
	var slow []net.Conn
	for range 5 {
		c, _ := net.Dial("tcp4", r.addr)
		io.WriteString(c, "GET / HT")
		slow = append(slow, c)
	}
	waitFor(t, "the five slow connections accepted", func() bool { return r.s.Stats().Accepted >= 5 })
	// Closed at once: the reset may even come before connect(2) returns.
	// A connection left open would have the read time out instead.
	if c, err := net.Dial("tcp4", r.addr); err == nil {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, err := c.Read(make([]byte, 1))
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			t.Errorf("a sixth slow connection from one address is still open after 2 s, want it closed at once")
		case !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET):
			t.Errorf("a sixth slow connection from one address: read %v, want it closed (EOF or reset)", err)
		}
		c.Close()
	} else if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatal(err)
	}
	if n := r.s.Stats().RefusedBusy; n != 1 {
		t.Errorf("refused %d, want 1", n)
	}
	// One finishes its head: room again.
	io.WriteString(slow[0], "TP/1.1\r\n\r\n")
	if _, err := io.ReadAll(slow[0]); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for {
		resp, _, err := request(t, r.addr, "GET / HTTP/1.1\r\n\r\n")
		if err == nil && resp.StatusCode == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no room after a head completed: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, c := range slow {
		c.Close()
	}
}

// Bad heads get their answer, not a RST: an oversized head written in one
// piece gets its 431 although its rest was never read. Each answer is
// counted in tcpha_handoffs_total by its status.
func TestErrorAnswers(t *testing.T) {
	cfg := defaults()
	cfg.RequestTimeout = 300 * time.Millisecond
	r := newRig(t, cfg, toBE())
	for _, tc := range []struct {
		raw    string
		status int
	}{
		// Larger than the socket buffers: the client is still writing it
		// when the answer comes, as curl was when finding 10 saw a RST.
		{"GET / HTTP/1.1\r\nX-Big: " + strings.Repeat("a", 4<<20) + "\r\n\r\n", 431},
		{"\x16\x03\x01garbage\r\n\r\n", 400},
		{"GET / HTTP/1.1\r\nHost: x\r\n", 408},
	} {
		resp, _, err := request(t, r.addr, tc.raw)
		if err != nil || resp.StatusCode != tc.status {
			t.Errorf("%.20q: %v %v, want %d", tc.raw, resp, err, tc.status)
		}
		sample := `tcpha_handoffs_total{result="` + strconv.Itoa(tc.status) + `"} 1` + "\n"
		if text := scrape(r.s.Metrics); !strings.Contains(text, sample) {
			t.Errorf("%.20q: no %q in /metrics:\n%s", tc.raw, sample, text)
		}
	}
}

// scrape returns m's /metrics text.
func scrape(m *metrics.Metrics) string {
	w := httptest.NewRecorder()
	promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}).ServeHTTP(w, httptest.NewRequest("GET", "/metrics", nil))
	return w.Body.String()
}

func TestNoBEAnd503(t *testing.T) {
	r := newRig(t, defaults(), toBE())
	r.m.fail = handoff.ErrNoBE
	resp, body, err := request(t, r.addr, "GET /x HTTP/1.1\r\n\r\n")
	if err != nil || resp.StatusCode != 503 || !strings.Contains(body, "no back end available for /x") {
		t.Errorf("%v %q %v", resp, body, err)
	}
	if r.s.Stats().Answered503 != 1 {
		t.Errorf("503 not counted: %+v", r.s.Stats())
	}
}

// The local node serves what its rule sends it, and what every BE refused
// when a local rule matched as the fallback.
func TestLocalNode(t *testing.T) {
	web, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer web.Close()
	go http.Serve(web, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "local:"+r.URL.Path) }))
	cfg := defaults()
	cfg.Local = netip.MustParseAddrPort(web.Addr().String())
	r := newRig(t, cfg, backends.Route{Local: true})
	if _, body, err := request(t, r.addr, "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil || body != "local:/status" {
		t.Errorf("local: %q %v", body, err)
	}
	fallback := newRig(t, cfg, backends.Route{BEs: toBE().BEs, Local: true})
	fallback.m.fail = handoff.ErrNoBE
	if _, body, err := request(t, fallback.addr, "GET /f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil || body != "local:/f" {
		t.Errorf("fallback: %q %v", body, err)
	}
	if fallback.m.kept.Load() != 1 {
		t.Error("a locally served connection's old forwarding was not cleared (Keep)")
	}
}

// An upgrade hands the connections still sending their heads to the
// successor with what was read of them; the clients notice nothing, and
// those that connect in between wait in the shared listener's queue.
func TestHandoverHeads(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	ln2, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	newServer := func() (*Server, *fakeMigrator) {
		m := &fakeMigrator{}
		return &Server{Config: defaults(), Route: func(backends.Request) backends.Route { return toBE() }, Sender: m,
			Metrics: metrics.New(), Log: slog.New(slog.NewTextHandler(io.Discard, nil))}, m
	}
	old, oldM := newServer()
	stopAccept, cancel := context.WithCancel(context.Background())
	defer cancel()
	oldDone := make(chan struct{})
	go func() { old.Serve(stopAccept, context.Background(), ln); close(oldDone) }()

	var clients []net.Conn
	for range 5 {
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET /x HT")
		clients = append(clients, c)
	}
	waitFor(t, "five heads being read", func() bool { return old.reading.Load() >= 5 })
	cancel()
	ctx, done := context.WithTimeout(context.Background(), 2*time.Second)
	defer done()
	heads := old.Handover(ctx)
	<-oldDone
	// A client that comes while neither serves waits in the queue. It
	// dials once the old server has stopped accepting: dialed before,
	// it could still be accepted there and handed over as a sixth head.
	late := make(chan string, 1)
	go func() {
		_, body, err := request(t, ln.Addr().String(), "GET /late HTTP/1.1\r\n\r\n")
		late <- fmt.Sprint(body, err)
	}()
	if len(heads) != 5 {
		t.Fatalf("handed %d heads, want 5", len(heads))
	}
	for _, h := range heads {
		// What the old agent read goes along; the rest is in the socket.
		if !strings.HasPrefix("GET /x HT", string(h.Read)) {
			t.Errorf("handed head %q", h.Read)
		}
	}
	succ, succM := newServer()
	ctx2, cancel2 := context.WithCancel(context.Background())
	succDone := make(chan struct{})
	go func() { succ.Serve(ctx2, context.Background(), ln2); close(succDone) }()
	defer func() { cancel2(); <-succDone }()
	for _, h := range heads {
		succ.Resume(context.Background(), h)
	}
	for _, c := range clients {
		io.WriteString(c, "TP/1.1\r\n\r\n")
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatalf("a handed-over client: %v", err)
		}
		if body, _ := io.ReadAll(resp.Body); resp.StatusCode != 200 || string(body) != "be" {
			t.Errorf("a handed-over client got %d %q", resp.StatusCode, body)
		}
	}
	if got := <-late; got != "be<nil>" {
		t.Errorf("the client that came in between: %s", got)
	}
	if oldM.migrated.Load() != 0 || succM.migrated.Load() != 6 {
		t.Errorf("migrated: old %d, successor %d; want 0 and 6", oldM.migrated.Load(), succM.migrated.Load())
	}
	if n := succ.reading.Load(); n != 0 {
		t.Errorf("%d heads still counted as being read", n)
	}
}

// nameMigrator "hands off" to the first BE of the route by answering with
// its address, so a test sees where a request went.
type nameMigrator struct{ fakeMigrator }

func (m *nameMigrator) Migrate(_ context.Context, sock handoff.Socket, _ netip.AddrPort, _ []byte, bes []netip.AddrPort) (netip.AddrPort, error) {
	c := sock.(repair.Socket).Conn
	name := bes[0].Addr().String()
	fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(name), name)
	c.Close()
	return bes[0], nil
}

// Issue 19: the rules see the path nginx will serve, not the target as
// sent: a fragment, dot segments and escapes cannot pick another BE's
// rule, and a path above the root is refused as nginx refuses it.
func TestRoutesOnTheServedPath(t *testing.T) {
	be := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	sched := backends.NewScheduler(backends.Table{
		Servers: []backends.Server{{Addr: be("10.0.0.1"), Port: 666, Weight: 1},
			{Addr: be("10.0.0.2"), Port: 666, Weight: 1}, {Addr: be("10.0.0.3"), Port: 666, Weight: 1}},
		Rules: []backends.Rule{
			{Targets: []netip.Addr{be("10.0.0.2")}, Pattern: regexp.MustCompile(`\.jpg$`)},
			{Targets: []netip.Addr{be("10.0.0.3")}, Pattern: regexp.MustCompile(`^/img/`)},
			{Targets: []netip.Addr{be("10.0.0.1")}, Pattern: regexp.MustCompile(`.*`)},
		},
	}, backends.Options{})
	for _, a := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
		if _, err := sched.Session(be(a), true); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{Config: defaults(), Route: sched.Route, Sender: &nameMigrator{},
		Metrics: metrics.New(), Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(ctx, context.Background(), ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	for _, tc := range []struct {
		target string
		status int
		be     string
	}{
		{"/index.html#.jpg", 200, "10.0.0.1"}, // nginx serves /index.html
		{"/x/../img/a.jpg", 200, "10.0.0.2"},  // /img/a.jpg
		{"/x/../img/a.png", 200, "10.0.0.3"},  // /img/a.png
		{"/img/../secret", 200, "10.0.0.1"},   // /secret
		{"/img/%2e%2e/secret", 200, "10.0.0.1"},
		{"//img//a.png", 200, "10.0.0.3"},
		{"/a.jpg?x", 200, "10.0.0.2"},
		{"/a.jpg%3F", 200, "10.0.0.1"}, // nginx's $uri is "/a.jpg?"
		{"http://www.example.com/img/a.png", 200, "10.0.0.3"},
		{"/../img/a.png", 400, ""},
	} {
		resp, body, err := request(t, ln.Addr().String(), "GET "+tc.target+" HTTP/1.1\r\nHost: x\r\n\r\n")
		if err != nil || resp.StatusCode != tc.status || tc.be != "" && body != tc.be {
			t.Errorf("%s: %v %q %v, want %d from %s", tc.target, resp, body, err, tc.status, tc.be)
		}
	}
	// RFC 9112 section 2.2: an empty line before the request line is
	// ignored.
	resp, body, err := request(t, ln.Addr().String(), "\r\nGET /img/a.png HTTP/1.1\r\nHost: x\r\n\r\n")
	if err != nil || resp.StatusCode != 200 || body != "10.0.0.3" {
		t.Errorf("after an empty line: %v %q %v", resp, body, err)
	}
}
