package ctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tcpha/handoff/wire"
	"tcpha/internal/testlog"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func feConfig(secret string, h Handler) *Config {
	return &Config{
		Secret:  secretBytes(secret),
		Local:   wire.Hello{Role: wire.RoleFE, Addr: netip.MustParseAddrPort("127.0.0.1:0"), VIP: netip.MustParseAddrPort("10.0.0.100:80")},
		Handler: h, Log: quiet(),
		HandshakeTimeout: 2 * time.Second,
	}
}

func beConfig(secret string, h Handler) *Config {
	return &Config{
		Secret:  secretBytes(secret),
		Local:   wire.Hello{Role: wire.RoleBE, Addr: netip.MustParseAddrPort("127.0.0.1:666")},
		Handler: h, Log: quiet(),
		Health:           func([]byte) wire.Health { return wire.Health{ServerUp: true, Active: 7} },
		HandshakeTimeout: 2 * time.Second,
	}
}

func secretBytes(s string) []byte {
	if s == "" {
		return nil
	}
	return []byte(s)
}

// echo answers every request with an Ack whose reason is the request's
// payload, after delay(payload).
func echo(delay func(p []byte) time.Duration) Handler {
	return HandlerFunc(func(s *Session, f wire.Frame) {
		go func() {
			if delay != nil {
				time.Sleep(delay(f.Payload))
			}
			s.Reply(f, AckFrame(wire.ResultOK, string(f.Payload)))
		}()
	})
}

type serverRig struct {
	addr netip.AddrPort
	sv   *Server
	stop func()
}

func startServer(t *testing.T, cfg *Config, tune func(*Server)) *serverRig {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sv := &Server{Config: cfg}
	if tune != nil {
		tune(sv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { sv.Serve(ctx, ln); close(done) }()
	r := &serverRig{addr: netip.MustParseAddrPort(ln.Addr().String()), sv: sv, stop: func() { cancel(); <-done }}
	t.Cleanup(r.stop)
	return r
}

func dialTCP(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
	return (&net.Dialer{}).DialContext(ctx, "tcp4", a.String())
}

func dialOne(t *testing.T, cfg *Config, a netip.AddrPort) *Session {
	t.Helper()
	c, err := dialTCP(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	s, err := Dial(c, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func reason(t *testing.T, f wire.Frame) string {
	t.Helper()
	var a wire.Ack
	if err := a.UnmarshalBinary(f.Payload); err != nil {
		t.Fatal(err)
	}
	return a.Reason
}

// Many requests share one session and each gets its own answer, whatever
// order the answers come in; a slow one holds up nobody: the 500 others
// complete while it is still held.
func TestManyConcurrentCallsOneSession(t *testing.T) {
	for _, secret := range []string{"", "cluster-key"} {
		t.Run(fmt.Sprintf("secret=%q", secret), func(t *testing.T) {
			gate := make(chan struct{})
			h := HandlerFunc(func(s *Session, f wire.Frame) {
				go func() {
					if string(f.Payload) == "slow" {
						<-gate
					} else {
						time.Sleep(time.Duration(len(f.Payload)%7) * time.Millisecond)
					}
					s.Reply(f, AckFrame(wire.ResultOK, string(f.Payload)))
				}()
			})
			srv := startServer(t, beConfig(secret, h), nil)
			s := dialOne(t, feConfig(secret, nil), srv.addr)

			slow := make(chan error, 1)
			go func() {
				r, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer, Payload: []byte("slow")})
				if err == nil && reason(t, r) != "slow" {
					err = fmt.Errorf("slow call got %q", reason(t, r))
				}
				slow <- err
			}()
			var wg sync.WaitGroup
			var bad atomic.Int64
			for i := range 500 {
				wg.Go(func() {
					want := fmt.Sprintf("offer-%d", i)
					r, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer, Payload: []byte(want)})
					if err != nil || reason(t, r) != want {
						bad.Add(1)
					}
				})
			}
			wg.Wait()
			if bad.Load() != 0 {
				t.Fatalf("%d of 500 answers wrong or missing", bad.Load())
			}
			select {
			case err := <-slow:
				t.Fatalf("the slow call returned before it was released: %v", err)
			default:
			}
			close(gate)
			if err := <-slow; err != nil {
				t.Error(err)
			}
			if s.Inflight() != 0 {
				t.Errorf("inflight %d after all answers", s.Inflight())
			}
		})
	}
}

// A session that dies fails the requests in flight on it at once, with the
// reason, and no later.
func TestSessionDeathFailsInflight(t *testing.T) {
	never := make(chan struct{})
	defer close(never)
	h := HandlerFunc(func(s *Session, f wire.Frame) {
		go func() { <-never; s.Reply(f, AckFrame(wire.ResultOK, "")) }()
	})
	srv := startServer(t, beConfig("k", h), nil)
	s := dialOne(t, feConfig("k", nil), srv.addr)
	errs := make(chan error, 10)
	for range 10 {
		go func() {
			_, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer})
			errs <- err
		}()
	}
	for s.Inflight() < 10 {
		time.Sleep(time.Millisecond)
	}
	srv.stop() // closes every session
	for range 10 {
		select {
		case err := <-errs:
			if err == nil {
				t.Error("a call on a dead session succeeded")
			}
		case <-time.After(2 * time.Second):
			t.Fatal("a call on a dead session did not return")
		}
	}
	if _, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer}); err == nil {
		t.Error("a call after the session's end succeeded")
	}
}

func TestProbeAndGoAway(t *testing.T) {
	srv := startServer(t, beConfig("", echo(nil)), nil)
	s := dialOne(t, feConfig("", nil), srv.addr)
	r, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeProbe})
	if err != nil || r.Type != wire.TypeProbeReply {
		t.Fatalf("probe: %+v %v", r, err)
	}
	var h wire.Health
	if err := h.UnmarshalBinary(r.Payload); err != nil || h.Active != 7 || !h.ServerUp {
		t.Errorf("health %+v %v", h, err)
	}
	for _, peer := range srv.sv.Sessions() {
		peer.GoAway()
	}
	deadline := time.Now().Add(time.Second)
	for !s.GoingAway() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if !s.GoingAway() {
		t.Error("goaway not seen")
	}
}

// The handshake refuses a peer without the secret, with another secret, or
// with one where this end has none, and both ends say why.
func TestHandshakeRefusals(t *testing.T) {
	cases := []struct{ fe, be, want string }{
		{"a", "b", "does not hold this cluster's secret"},
		{"", "b", "the peer has a cluster secret, this agent has none"},
		{"a", "", "the peer has no cluster secret, this agent has one"},
	}
	for _, tc := range cases {
		srv := startServer(t, beConfig(tc.be, echo(nil)), nil)
		c, err := dialTCP(context.Background(), srv.addr)
		if err != nil {
			t.Fatal(err)
		}
		_, err = Dial(c, feConfig(tc.fe, nil))
		if !errors.Is(err, ErrHandshake) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("fe %q be %q: %v, want %q", tc.fe, tc.be, err, tc.want)
		}
	}
}

// The acceptor, too, says why when the dialer's secret differs: the dialer
// checks the acceptor's proof first and hangs up.
func TestAcceptorNamesWrongSecret(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- err
			return
		}
		defer c.Close()
		_, err = Accept(c, feConfig("a", nil), nil)
		accepted <- err
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Dial(c, beConfig("b", nil)); err == nil {
		t.Fatal("the dialer accepted a wrong secret")
	}
	c.Close()
	if err := <-accepted; err == nil || !strings.Contains(err.Error(), "does not hold this cluster's secret") {
		t.Errorf("the acceptor: %v", err)
	}
}

// A session recorded byte for byte and played back to the acceptor fails:
// the acceptor's nonce is new, so the recorded proof and MACs do not match.
func TestReplayedSessionRefused(t *testing.T) {
	var served atomic.Int64
	h := HandlerFunc(func(s *Session, f wire.Frame) {
		served.Add(1)
		s.Reply(f, AckFrame(wire.ResultOK, ""))
	})
	srv := startServer(t, beConfig("k", h), nil)
	// Record what the dialer sends.
	raw, err := dialTCP(context.Background(), srv.addr)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{Conn: raw}
	s, err := Dial(rec, feConfig("k", nil))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer, Payload: []byte("once")}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if served.Load() != 1 {
		t.Fatalf("served %d", served.Load())
	}
	c, err := dialTCP(context.Background(), srv.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(rec.bytes())
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	io.Copy(io.Discard, c) // until the acceptor closes
	time.Sleep(50 * time.Millisecond)
	if served.Load() != 1 {
		t.Errorf("the replayed session's request was served (%d)", served.Load())
	}
	if srv.sv.Refused()[RefusedHandshake] == 0 {
		t.Error("the replay was not counted as a refused handshake")
	}
}

type recorder struct {
	net.Conn
	mu  sync.Mutex
	buf bytes.Buffer
}

func (r *recorder) Write(b []byte) (int, error) {
	r.mu.Lock()
	r.buf.Write(b)
	r.mu.Unlock()
	return r.Conn.Write(b)
}

func (r *recorder) bytes() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]byte(nil), r.buf.Bytes()...)
}

// Strangers cost little: a non-member is closed before anything is read, a
// member that never finishes its handshake is cut at the deadline or by a
// newer connection from its source, and the per-source cap holds.
func TestServerBounds(t *testing.T) {
	srv := startServer(t, beConfig("k", echo(nil)), func(sv *Server) {
		sv.Member = func(a netip.Addr) bool { return a == netip.MustParseAddr("127.0.0.1") }
		sv.MaxHandshaking = 3
		sv.Config.HandshakeTimeout = 300 * time.Millisecond
	})
	// A member that sends 3 bytes and waits.
	var idle []net.Conn
	for range 5 {
		c, err := dialTCP(context.Background(), srv.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte{1, 2, 3})
		idle = append(idle, c)
	}
	start := time.Now()
	for _, c := range idle {
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("a stalled handshake got an answer")
		}
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("stalled handshakes held for %v", took)
	}
	time.Sleep(50 * time.Millisecond)
	ref := srv.sv.Refused()
	if ref[RefusedEvicted] != 2 || ref[RefusedHandshake] != 5 {
		t.Errorf("refused %v: want 2 evicted for newer ones and 5 failed handshakes", ref)
	}
	// A claimed 8 MiB hello is refused at its header.
	c, _ := dialTCP(context.Background(), srv.addr)
	h, _ := wire.AppendFrame(nil, wire.Frame{Type: wire.TypeHello, Payload: make([]byte, 10)}, nil)
	h[20], h[21], h[22], h[23] = 0, 0x80, 0, 0
	c.Write(h[:wire.HeaderLen])
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, syscall.ETIMEDOUT) {
		t.Errorf("oversized hello: %v, want a close", err)
	}
	c.Close()
	// And a real FE still gets in.
	s := dialOne(t, feConfig("k", nil), srv.addr)
	if _, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer}); err != nil {
		t.Fatal(err)
	}
}

// A stranger on the FE's host connects from the FE's address and may hold
// every handshake slot of that source, silent or after a Hello it cannot
// back with a proof; the genuine FE still gets its session at once, long
// before those handshakes time out (issue 19: 16 half-open connections
// locked a restarted BE out of its cluster).
func TestStrangersCannotStarveTheFE(t *testing.T) {
	for _, stall := range []string{"silent", "after-hello"} {
		t.Run(stall, func(t *testing.T) {
			srv := startServer(t, beConfig("k", echo(nil)), func(sv *Server) {
				sv.Member = func(a netip.Addr) bool { return a == netip.MustParseAddr("127.0.0.1") }
				sv.Config.HandshakeTimeout = time.Minute
			})
			fe := feConfig("k", nil)
			for range 2 * DefaultMaxHandshaking {
				c, err := dialTCP(context.Background(), srv.addr)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				if stall == "silent" {
					continue
				}
				// The stranger knows the format: a Hello like the FE's.
				h := fe.Local
				h.Keyed = true
				p, _ := h.MarshalBinary()
				b, _ := wire.AppendFrame(nil, wire.Frame{Type: wire.TypeHello, Payload: p}, nil)
				c.Write(b)
				// The BE's Hello says it admitted this one and now waits
				// for a proof that never comes.
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				if _, err := io.ReadFull(c, make([]byte, wire.HeaderLen)); err != nil {
					t.Fatalf("stranger's hello not answered: %v", err)
				}
			}
			time.Sleep(20 * time.Millisecond) // the silent ones are accepted
			start := time.Now()
			c, err := dialTCP(context.Background(), srv.addr)
			if err != nil {
				t.Fatal(err)
			}
			s, err := Dial(c, fe)
			if err != nil {
				t.Fatalf("the FE was kept out: %v", err)
			}
			defer s.Close()
			if _, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer}); err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("the FE's session took %v", took)
			}
			if n := srv.sv.Refused()[RefusedEvicted]; n != DefaultMaxHandshaking+1 {
				t.Errorf("%d handshakes evicted, want %d", n, DefaultMaxHandshaking+1)
			}
		})
	}
}

// A newcomer takes the slot of the oldest handshake still without a Hello,
// else of the oldest: a genuine peer has sent its Hello by the time a
// stranger's silent connections could crowd it out.
func TestEvictPicksSilentFirst(t *testing.T) {
	for _, tc := range []struct {
		hello []bool
		want  int
	}{
		{[]bool{true, true, false, false}, 2},
		{[]bool{false, true}, 0},
		{[]bool{true, true, true}, 0},
	} {
		var hs []*pending
		var conns []*closeConn
		for _, h := range tc.hello {
			c := &closeConn{}
			p := &pending{conn: c}
			p.hello.Store(h)
			hs, conns = append(hs, p), append(conns, c)
		}
		if got := evict(hs); got != tc.want {
			t.Errorf("hello %v: evicted %d, want %d", tc.hello, got, tc.want)
		}
		for i, c := range conns {
			if c.closed != (i == tc.want) {
				t.Errorf("hello %v: connection %d closed %v", tc.hello, i, c.closed)
			}
		}
	}
}

// closeConn is a connection that only records its Close.
type closeConn struct {
	net.Conn
	closed bool
}

func (c *closeConn) Close() error { c.closed = true; return nil }

func TestServerRefusesNonMembers(t *testing.T) {
	srv := startServer(t, beConfig("", echo(nil)), func(sv *Server) {
		sv.Member = func(netip.Addr) bool { return false }
	})
	c, err := dialTCP(context.Background(), srv.addr)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Dial(c, feConfig("", nil))
	if err == nil {
		t.Fatal("a non-member got a session")
	}
	if srv.sv.Refused()[RefusedNotMember] != 1 {
		t.Errorf("refused %v", srv.sv.Refused())
	}
}

func TestAdmitRefuses(t *testing.T) {
	srv := startServer(t, beConfig("k", echo(nil)), func(sv *Server) {
		sv.Admit = func(_ net.Addr, h wire.Hello) error {
			if h.Role != wire.RoleBE {
				return errors.New("only BEs")
			}
			return nil
		}
	})
	c, _ := dialTCP(context.Background(), srv.addr)
	if _, err := Dial(c, feConfig("k", nil)); err == nil {
		t.Error("admit did not refuse")
	}
}

// flakyListener fails Accept with EMFILE a few times, as a process out of
// file descriptors does.
type flakyListener struct {
	net.Listener
	fails atomic.Int64
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.fails.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	}
	return l.Listener.Accept()
}

func TestServerSurvivesEMFILE(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := &flakyListener{Listener: ln}
	fl.fails.Store(5)
	sv := &Server{Config: beConfig("", echo(nil))}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go sv.Serve(ctx, fl)
	s := dialOne(t, feConfig("", nil), netip.MustParseAddrPort(ln.Addr().String()))
	if _, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer}); err != nil {
		t.Fatalf("after EMFILE: %v", err)
	}
}

// The pool keeps per sessions up, never dials on Get, and redials in the
// background after the peer comes back.
func TestPoolReconnects(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ln.Addr().String())
	serve := func(ln net.Listener) func() {
		sv := &Server{Config: beConfig("k", echo(nil))}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { sv.Serve(ctx, ln); close(done) }()
		return func() { cancel(); <-done }
	}
	stop := serve(ln)
	var dials atomic.Int64
	var changes []bool
	var mu sync.Mutex
	p := NewPool(feConfig("k", nil), func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
		dials.Add(1)
		return dialTCP(ctx, a)
	}, 3)
	p.OnChange = func(_ netip.AddrPort, up bool, _ error) { mu.Lock(); changes = append(changes, up); mu.Unlock() }
	var sessions atomic.Int64
	p.OnSession = func(_ netip.AddrPort, s *Session) { sessions.Add(1) }
	defer p.Close()
	p.Add(addr)
	waitFor(t, func() bool { return len(p.Sessions(addr)) == 3 }, "3 sessions up")
	before := dials.Load()
	for range 100 {
		s, err := p.Get(addr, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer}); err != nil {
			t.Fatal(err)
		}
	}
	if dials.Load() != before {
		t.Errorf("Get dialed %d times", dials.Load()-before)
	}
	stop()
	waitFor(t, func() bool { return len(p.Sessions(addr)) == 0 }, "sessions down")
	if _, err := p.Get(addr, nil); !errors.Is(err, ErrNoSession) {
		t.Errorf("Get with the peer down: %v", err)
	}
	ln2, err := net.Listen("tcp4", addr.String())
	if err != nil {
		t.Skipf("port %v not free again: %v", addr, err)
	}
	stop = serve(ln2)
	defer stop()
	waitFor(t, func() bool { return len(p.Sessions(addr)) == 3 }, "sessions back")
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(changes) != "[true false true]" {
		t.Errorf("OnChange calls %v", changes)
	}
	if n := sessions.Load(); n != 6 {
		t.Errorf("OnSession called %d times, want 6 (3 sessions, twice)", n)
	}
}

func TestPoolGetSkipsFailedAndGoingAway(t *testing.T) {
	srv := startServer(t, beConfig("", echo(nil)), nil)
	p := NewPool(feConfig("", nil), dialTCP, 2)
	defer p.Close()
	p.Add(srv.addr)
	waitFor(t, func() bool { return len(p.Sessions(srv.addr)) == 2 }, "2 sessions")
	ss := p.Sessions(srv.addr)
	if s, _ := p.Get(srv.addr, ss[0]); s != ss[1] {
		t.Error("Get returned the excluded session")
	}
	ss[1].goAway.Store(true)
	if s, _ := p.Get(srv.addr, nil); s != ss[0] {
		t.Error("a going-away session was picked over a live one")
	}
	if s, _ := p.Get(srv.addr, ss[0]); s != ss[1] {
		t.Error("with no other, a going-away session is still used until its replacement is up")
	}
	ss[1].Close()
	if _, err := p.Get(srv.addr, ss[0]); !errors.Is(err, ErrNoSession) {
		t.Errorf("a closed session was picked: %v", err)
	}
	if _, err := p.Get(netip.MustParseAddrPort("127.0.0.1:1"), nil); !errors.Is(err, ErrNoSession) {
		t.Errorf("unknown peer: %v", err)
	}
	p.Remove(srv.addr)
	waitFor(t, func() bool { return len(srv.sv.Sessions()) == 0 }, "sessions closed by Remove")
}

// The dialing end probes an idle session: a live peer keeps it, and one
// that stopped answering (frozen, or gone without a FIN) ends it.
func TestKeepAlive(t *testing.T) {
	for _, frozen := range []bool{false, true} {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if frozen {
				// Handshake, then never read or answer again.
				handshake(c, beConfig("", nil), false, nil)
				return
			}
			Accept(c, beConfig("", nil), nil)
		}()
		// Probes after 200 ms of silence, each allowed 400 ms: a frozen peer
		// is noticed after about 600 ms; a live one is probed several times
		// in the 2 s watched.
		cfg := feConfig("", nil)
		cfg.KeepAlive = 200 * time.Millisecond
		c, _ := dialTCP(context.Background(), netip.MustParseAddrPort(ln.Addr().String()))
		s, err := Dial(c, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		select {
		case <-s.Done():
			if !frozen {
				t.Errorf("a live peer's session ended: %v", s.Err())
			} else if !strings.Contains(s.Err().Error(), "keepalive") {
				t.Errorf("frozen peer: session ended with %v, want a keepalive failure", s.Err())
			}
		case <-time.After(2 * time.Second):
			if frozen {
				t.Error("a frozen peer's session is still up")
			}
		}
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A version-1 peer's first frame is refused at its header and the
// connection closed, and the reason is counted and logged.
func TestVersion1PeerRefused(t *testing.T) {
	var logged testlog.Buffer
	cfg := beConfig("", echo(nil))
	cfg.Log = slog.New(slog.NewTextHandler(&logged, nil))
	srv := startServer(t, cfg, nil)
	c, err := dialTCP(context.Background(), srv.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A v1 request header: magic, version 1, type 1, flags, reserved,
	// conn_magic, length, then a payload.
	v1 := []byte{0x01, 0x29, 0x68, 0xb9, 1, 1, 0, 0, 0, 0, 0, 7, 0, 0, 0, 20}
	c.Write(append(v1, make([]byte, 20)...))
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, err := c.Read(make([]byte, 64)); err == nil {
		t.Errorf("a v1 peer got %d bytes back", n)
	}
	waitFor(t, func() bool { return srv.sv.Refused()[RefusedHandshake] == 1 }, "the refusal counted")
	if !strings.Contains(logged.String(), "unsupported protocol version: 1 (this agent speaks 2)") {
		t.Errorf("log does not say why:\n%s", logged.String())
	}
}

// offerCommit serves offers and their commits as a BE does, and records
// which it saw: every offer it acknowledged must get its commit on it.
type offerCommit struct {
	mu              sync.Mutex
	offers, commits map[string]bool
}

func newOfferCommit() *offerCommit {
	return &offerCommit{offers: map[string]bool{}, commits: map[string]bool{}}
}

func (h *offerCommit) Serve(s *Session, f wire.Frame) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch f.Type {
	case wire.TypeOffer:
		h.offers[string(f.Payload)] = true
		s.Reply(f, AckFrame(wire.ResultOK, ""))
	case wire.TypeCommit:
		h.commits[string(f.Payload)] = true
	}
}

func (h *offerCommit) unmatched() (offers, commits int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for k := range h.offers {
		if !h.commits[k] {
			offers++
		}
	}
	for k := range h.commits {
		if !h.offers[k] {
			commits++
		}
	}
	return offers, commits
}

// A BE handing over to a successor that shares its listener drains its
// sessions: under a steady stream of offers the FE moves to new sessions
// without a failed offer, every commit reaches the end that took its
// offer, and the old end is left with no session long before the deadline.
func TestDrainHandsSessionsToSuccessor(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddrPort(ln.Addr().String())
	dup, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	ln2, err := net.FileListener(dup)
	dup.Close()
	if err != nil {
		t.Fatal(err)
	}
	oldH, newH := newOfferCommit(), newOfferCommit()
	old := &Server{Config: beConfig("k", oldH)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	oldDone := make(chan struct{})
	go func() { old.Serve(ctx, ln); close(oldDone) }()

	p := NewPool(feConfig("k", nil), dialTCP, 2)
	defer p.Close()
	p.Add(addr)
	waitFor(t, func() bool { return len(p.Sessions(addr)) == 2 }, "2 sessions")

	var failures atomic.Int64
	var n atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				s, err := p.Get(addr, nil)
				if err != nil || !s.Hold() {
					if err == nil {
						continue // retired between Get and Hold: pick again
					}
					failures.Add(1)
					t.Errorf("get: %v", err)
					return
				}
				id := []byte(fmt.Sprint(n.Add(1)))
				r, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer, Payload: id})
				if err != nil {
					s.Unhold()
					failures.Add(1)
					t.Errorf("offer: %v", err)
					return
				}
				time.Sleep(time.Millisecond) // the FE's switch to the BE
				err = s.Send(wire.Frame{Type: wire.TypeCommit, ID: r.ID, Payload: id})
				s.Unhold()
				if err != nil {
					failures.Add(1)
					t.Errorf("commit: %v", err)
					return
				}
			}
		})
	}
	time.Sleep(100 * time.Millisecond)
	// The successor serves on the shared listener; the old end stops
	// accepting and drains.
	succ := &Server{Config: beConfig("k", newH)}
	succDone := make(chan struct{})
	go func() { succ.Serve(ctx, ln2); close(succDone) }()
	ln.Close()
	start := time.Now()
	old.Drain(5 * time.Second)
	took := time.Since(start)
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	<-oldDone
	if took > 3*time.Second {
		t.Errorf("drain took %v: sessions were closed by the deadline, not retired", took)
	}
	if len(succ.Sessions()) != 2 {
		t.Errorf("the successor has %d sessions, want 2", len(succ.Sessions()))
	}
	for name, h := range map[string]*offerCommit{"old": oldH, "successor": newH} {
		// The last commits may still be on their way.
		waitFor(t, func() bool { o, c := h.unmatched(); return o == 0 && c == 0 }, name+" end's commits")
		if o, c := h.unmatched(); o != 0 || c != 0 {
			t.Errorf("%s end: %d offers without their commit, %d commits without their offer", name, o, c)
		}
		h.mu.Lock()
		t.Logf("%s end served %d offers", name, len(h.offers))
		if len(h.offers) == 0 {
			t.Errorf("%s end served no offer", name)
		}
		h.mu.Unlock()
	}
	cancel()
	<-succDone
}

// A session the peer leaves keeps taking work until its replacement is up:
// with the replacement's dial held back, a handoff still finds a session it
// can hold, and the old one retires only after the new one is up.
func TestLeavingSessionServesUntilReplaced(t *testing.T) {
	srv := startServer(t, beConfig("k", echo(nil)), nil)
	release := make(chan struct{})
	var dials atomic.Int64
	p := NewPool(feConfig("k", nil), func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
		if dials.Add(1) > 1 {
			select {
			case <-release:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		return dialTCP(ctx, a)
	}, 1)
	defer p.Close()
	p.Add(srv.addr)
	waitFor(t, func() bool { return len(p.Sessions(srv.addr)) == 1 }, "a session")
	for _, s := range srv.sv.Sessions() {
		s.GoAway()
	}
	waitFor(t, func() bool { return dials.Load() > 1 }, "the replacement's dial")
	time.Sleep(50 * time.Millisecond) // the old session would have retired by now
	for i := range 20 {
		s, err := p.Get(srv.addr, nil)
		if err != nil || !s.Hold() {
			t.Fatalf("handoff %d with the replacement not up: %v", i, err)
		}
		if _, err := s.Call(context.Background(), wire.Frame{Type: wire.TypeOffer}); err != nil {
			t.Fatal(err)
		}
		s.Unhold()
	}
	close(release)
	waitFor(t, func() bool {
		ss := p.Sessions(srv.addr)
		return len(ss) == 1 && !ss[0].GoingAway()
	}, "the replacement alone")
}

// A peer that leaves for good (its listener closed, a BE that stops): the
// session it leaves retires at once, not after retireWait, so that the
// peer's drain ends quickly.
func TestLeavingSessionRetiresWhenNoReplacement(t *testing.T) {
	srv := startServer(t, beConfig("k", echo(nil)), nil)
	var dials atomic.Int64
	p := NewPool(feConfig("k", nil), func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
		if dials.Add(1) > 1 {
			return nil, syscall.ECONNREFUSED
		}
		return dialTCP(ctx, a)
	}, 1)
	defer p.Close()
	p.Add(srv.addr)
	waitFor(t, func() bool { return len(p.Sessions(srv.addr)) == 1 }, "a session")
	start := time.Now()
	done := make(chan struct{})
	go func() { srv.sv.Drain(5 * time.Second); close(done) }()
	select {
	case <-done:
	case <-time.After(4 * time.Second):
		t.Fatal("the peer's drain waited for a replacement that cannot come")
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("drain took %v", took)
	}
}

// A request the peer made before it went away is answered before the
// session retires: a BE that drains (an upgrade) while its switch request
// is being served by the FE gets the FE's answer, not a goaway that
// crossed it (its move would be cut: the outcome unknown).
func TestRetireAnswersPeerRequestsFirst(t *testing.T) {
	srv := startServer(t, beConfig("k", echo(nil)), nil)
	p := NewPool(feConfig("k", echo(func([]byte) time.Duration { return 300 * time.Millisecond })), func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
		return dialTCP(ctx, a)
	}, 1)
	defer p.Close()
	p.Add(srv.addr)
	waitFor(t, func() bool { return len(srv.sv.Sessions()) == 1 }, "a session")
	be := srv.sv.Sessions()[0]
	done := make(chan error, 1)
	go func() {
		r, err := be.Call(context.Background(), wire.Frame{Type: wire.TypeSwitch, Payload: []byte("x")})
		if err == nil && r.Type != wire.TypeAck {
			err = fmt.Errorf("answer %v", r.Type)
		}
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // the request is with the FE's handler
	go srv.sv.Drain(5 * time.Second)
	if err := <-done; err != nil {
		t.Fatalf("the BE's request in flight at its drain: %v", err)
	}
}
