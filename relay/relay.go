package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"tcpha/handoff/conntab"
	"tcpha/internal/gopool"
	"tcpha/phttp"
)

// Config shapes a Relay.
type Config struct {
	// Pool holds the connections to the local web server.
	Pool *Pool
	// MaxHeader bounds a request head (431 beyond it); HeadTimeout the
	// time from a request's first byte to the end of its head (408).
	MaxHeader   int
	HeadTimeout time.Duration
	// IdleTimeout is how long a client may keep its connection open
	// between requests.
	IdleTimeout time.Duration
	Log         *slog.Logger
	// Route, if set, says what the FE's rules say of a connection's later
	// request (phttp = forward or multi); Decide makes of it where the
	// request goes. Unset, every request is served here. The first request
	// of a connection is always this BE's: the FE routed it here.
	Route func(path string) Rules
	// Mover, if set, moves a connection whose next request belongs to
	// other BEs to the right BE itself, while Mover.Moving says so (phttp
	// = multi); the plan's pools then serve only a request whose move
	// failed.
	Mover Mover
}

// Mover moves client connections to other BEs (multi-handoff).
type Mover interface {
	// Moving tells whether connections move now (phttp = multi).
	Moving() bool
	// Acked waits until the client acknowledged every byte sent on c:
	// only such a connection may move (WILLHANDOFF).
	Acked(ctx context.Context, c *net.TCPConn) error
	// Move hands c on, with pending (bytes read, not served) back in
	// front of its receive queue. Unless it returns Gone, c is back in
	// this BE's hands, usable.
	Move(c *net.TCPConn, pending []byte) (Outcome, error)
}

// Outcome is where a Mover left a connection.
type Outcome int

const (
	// Kept: still here; serve the request as its Plan says (back-end
	// forwarding, or 503).
	Kept Outcome = iota
	// Local: still here, and the request is this BE's after all.
	Local
	// Gone: another BE's now (or reset, when the move's outcome was
	// unknown); the session ends without touching the socket.
	Gone
)

// ackWait bounds WILLHANDOFF: a client that leaves a response
// unacknowledged this long gets its request served from here.
const ackWait = time.Second

// Relay serves handed-off client connections: for each request on a
// connection it finds where the request and its response end (phttp),
// carries them over a pooled keep-alive connection to the local web server,
// and then waits for the client's next request or ends the connection as
// HTTP says. Knowing where each exchange ends is what lets the BE reuse its
// upstream connections across clients and, with multi-handoff, stop at a
// response boundary.
type Relay struct {
	cfg Config
	Tracker

	requests, retries, badGateway atomic.Int64
	moves, moveFailures           atomic.Int64

	// handing is set while the relay hands its sessions to a successor
	// (handover.go); sessions register so that they can be kicked.
	handing  atomic.Bool
	mu       sync.Mutex
	sessions map[*session]struct{}
	handed   chan Handed
}

// New returns a relay with cfg, filling in defaults.
func New(cfg Config) *Relay {
	if cfg.MaxHeader <= 0 {
		cfg.MaxHeader = 8192
	}
	if cfg.HeadTimeout <= 0 {
		cfg.HeadTimeout = 10 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 75 * time.Second
	}
	r := &Relay{cfg: cfg}
	r.Spawn = gopool.New(256).Go
	return r
}

// Stats are a relay's counters.
type Stats struct {
	Active int
	// Retries are requests that needed a second upstream connection: the
	// first, idle before them, was found closed before they were sent, or
	// failed before any answer (Upstream.idled).
	Requests, Retries, BadGateways int64
	// Moves are connections moved to another BE; MoveFailures those
	// that stayed although their request was another BE's.
	Moves, MoveFailures int64
	Upstream            PoolStats
}

// Stats returns the relay's counters.
func (r *Relay) Stats() Stats {
	return Stats{Active: r.Active(), Requests: r.requests.Load(), Retries: r.retries.Load(),
		BadGateways: r.badGateway.Load(), Moves: r.moves.Load(), MoveFailures: r.moveFailures.Load(), Upstream: r.cfg.Pool.Stats()}
}

// bufSize is a session's client buffer: a request head, the start of its
// body, and pipelined requests behind it.
const bufSize = 16 << 10

var bufs = sync.Pool{New: func() any { return new([bufSize]byte) }}

// spliceMin is the body size from which bytes go socket to socket with
// splice(2) instead of through the relay's buffers (seed 4.2.2's zero-copy
// relay); below it, one read and one write cost less than the pipe.
const spliceMin = 64 << 10

// Serve runs a committed client connection until it ends, counted by the
// relay's Tracker. first is the upstream connection taken when the handoff
// was accepted (nil: take one when the first request is read).
func (r *Relay) Serve(client *net.TCPConn, first *Upstream) {
	r.Go(func() { r.serve(client, first) })
}

type session struct {
	r *Relay
	// count is the requests this session relayed (tcphactl conns reads
	// it); resumed says a predecessor relayed the connection's first.
	count   atomic.Int32
	resumed bool
	// state is the connection's conntab.State (the BE's states of seed
	// 4.8.2).
	state atomic.Uint32
	since time.Time
	// For a request routed to other BEs (phttp = forward): the pools
	// still to try if the chosen one fails before answering, and whether
	// the request is whole in hand, so that a failure can be answered
	// with the connection kept.
	routed, whole bool
	fallback      []*Pool
	client        *net.TCPConn
	buf           *[bufSize]byte
	max           int // head bound, within buf
	start         int // buf[start:end] is read and not yet relayed
	end           int
	up            *Upstream
	log           *slog.Logger
	// retryable: the request in s.sent may be sent again; responded: the
	// client got bytes of the current response already; unchecked: s.up
	// is the connection taken when the handoff was accepted, not looked at
	// since.
	retryable, responded, unchecked bool
	sent                            net.Buffers

	// For a handover: where the session is, the upstream connection a
	// kick must interrupt, what happens after the response in flight, and
	// whether the sockets went to a successor.
	phase   atomic.Int32
	kickUp  atomic.Pointer[net.TCPConn]
	after   afterBody
	handOff bool
}

// afterBody is what follows the response whose body is being relayed.
type afterBody struct {
	more  bool // the client connection goes on to another request
	reuse bool // the upstream connection may serve another
}

func (r *Relay) serve(client *net.TCPConn, first *Upstream) {
	s := r.newSession(client, first)
	if first != nil {
		// Taken when the handoff was accepted and held since: looked at
		// again before the request goes into it, and retried like a
		// pooled one (Upstream.idled).
		first.idled, s.unchecked = true, true
	}
	defer s.finish()
	s.loop()
}

func (r *Relay) newSession(client *net.TCPConn, up *Upstream) *session {
	s := &session{r: r, client: client, up: up, max: min(r.cfg.MaxHeader, bufSize), since: time.Now()}
	s.state.Store(uint32(conntab.Established))
	r.mu.Lock()
	if r.sessions == nil {
		r.sessions = map[*session]struct{}{}
	}
	r.sessions[s] = struct{}{}
	r.mu.Unlock()
	return s
}

// Conn is one relayed client connection, as tcphactl conns shows it on a
// BE.
type Conn struct {
	Client   netip.AddrPort
	Since    time.Time
	Requests int
	Busy     bool // in an exchange, not waiting for the next request
	// State is ESTABLISHED, or WILLHANDOFF and HANDOFFING while the
	// connection moves to another BE.
	State conntab.State
}

// Conns lists the connections the relay serves, oldest first.
func (r *Relay) Conns() []Conn {
	r.mu.Lock()
	out := make([]Conn, 0, len(r.sessions))
	for s := range r.sessions {
		c := Conn{Since: s.since, Requests: int(s.count.Load()), Busy: s.phase.Load() != phaseIdle,
			State: conntab.State(s.state.Load())}
		if a, ok := s.client.RemoteAddr().(*net.TCPAddr); ok {
			c.Client = a.AddrPort()
		}
		out = append(out, c)
	}
	r.mu.Unlock()
	slices.SortFunc(out, func(a, b Conn) int { return a.Since.Compare(b.Since) })
	return out
}

// Reset ends the session of client with a RST to the client, and tells
// whether there was one.
func (r *Relay) Reset(client netip.AddrPort) bool {
	r.mu.Lock()
	var found *session
	for s := range r.sessions {
		if a, ok := s.client.RemoteAddr().(*net.TCPAddr); ok && a.AddrPort() == client {
			found = s
			break
		}
	}
	r.mu.Unlock()
	if found == nil {
		return false
	}
	found.client.SetLinger(0)
	found.client.Close()
	if up := found.kickUp.Load(); up != nil {
		up.Close()
	}
	return true
}

// loop serves requests until the connection ends or goes to a successor.
func (s *session) loop() {
	for {
		h, err := s.readHead()
		if errors.Is(err, errHandedOff) {
			return
		}
		if err != nil {
			s.refuse(err)
			return
		}
		plan := s.plan(h.Path)
		out := s.move(h, plan)
		if out == Gone {
			return
		}
		if out == Local {
			plan = here
		}
		s.r.requests.Add(1)
		more, err := s.exchange(h, plan)
		s.count.Add(1)
		if errors.Is(err, errHandedOff) {
			return
		}
		if err != nil {
			s.logf().Info("relay ended", "op", "relay", "err", err)
			return
		}
		if !more {
			s.closeGracefully()
			return
		}
	}
}

func (s *session) logf() *slog.Logger {
	if s.log == nil {
		s.log = s.r.cfg.Log.With("client", s.client.RemoteAddr().String())
	}
	return s.log
}

// finish closes what is left; an upstream still held was not returned to
// the pool because its exchange did not end cleanly. Sockets handed to a
// successor are its own.
func (s *session) finish() {
	s.r.mu.Lock()
	delete(s.r.sessions, s)
	s.r.mu.Unlock()
	if s.handOff {
		return
	}
	if s.up != nil {
		s.up.Close()
		s.up = nil
	}
	s.client.Close()
	s.release()
}

func (s *session) release() {
	if s.buf != nil && s.start == s.end {
		bufs.Put(s.buf)
		s.buf, s.start, s.end = nil, 0, 0
	}
}

// errClientGone is a client that closed (or reset) between requests.
var errClientGone = errors.New("client closed")

// quietAfter is how long a session waits for a keep-alive client's next
// request with its buffer held. A busy client sends it at once; one quiet
// that long gives the buffer back and waits without one.
const quietAfter = 50 * time.Millisecond

// readHead reads the next request head. Between requests a quiet
// connection holds no buffer: it waits for the socket to become readable
// first, so an idle keep-alive connection costs its goroutine and its
// socket only.
func (s *session) readHead() (*phttp.Head, error) {
	// Between requests a session can go to a successor as it is: its
	// sockets and the bytes of the next request it has read.
	s.phase.Store(phaseIdle)
	defer s.phase.Store(phaseWork)
	if s.r.handing.Load() {
		return nil, s.exportIdle()
	}
	idleUntil := time.Now().Add(s.r.cfg.IdleTimeout)
	if s.start < s.end && phttp.OnlyEmptyLines(s.buf[s.start:s.end]) {
		// The CRLF some clients send after a body (RFC 9112 section 2.2)
		// does not start a request: the connection is idle, not slow.
		s.start = s.end
	}
	if s.start == s.end {
		s.start, s.end = 0, 0
		if s.buf == nil {
			s.buf = bufs.Get().(*[bufSize]byte)
		}
		s.client.SetReadDeadline(time.Now().Add(quietAfter))
		n, err := s.client.Read(s.buf[:s.max])
		s.end = n
		switch {
		case n > 0:
		case errors.Is(err, os.ErrDeadlineExceeded):
			if s.r.handing.Load() {
				return nil, s.exportIdle()
			}
			s.release()
			s.client.SetReadDeadline(idleUntil)
			if err := waitReadable(s.client); err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) && s.r.handing.Load() {
					return nil, s.exportIdle()
				}
				return nil, err
			}
			s.buf = bufs.Get().(*[bufSize]byte)
		case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
			return nil, errClientGone
		default:
			return nil, err
		}
	}
	headDeadline := time.Now().Add(s.r.cfg.HeadTimeout)
	s.client.SetReadDeadline(headDeadline)
	for {
		if s.end > s.start {
			h, err := phttp.ParseRequest(s.buf[s.start:s.end])
			if err == nil {
				return h, nil
			}
			if !errors.Is(err, phttp.ErrIncomplete) {
				return nil, err
			}
			if s.end-s.start >= s.max {
				return nil, fmt.Errorf("%w: no end of head within %d bytes", phttp.ErrHeaderTooLarge, s.max)
			}
		}
		if s.start > 0 {
			copy(s.buf[:], s.buf[s.start:s.end])
			s.end -= s.start
			s.start = 0
		}
		n, err := s.client.Read(s.buf[s.end:s.max])
		s.end += n
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && s.r.handing.Load() {
				return nil, s.exportIdle()
			}
			if s.end == s.start && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
				return nil, errClientGone
			}
			return nil, err
		}
	}
}

// waitReadable blocks until c has data (or an error or EOF) without
// reading it.
func waitReadable(c *net.TCPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var one [1]byte
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		_, _, e := unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		if errors.Is(e, unix.EAGAIN) {
			return false
		}
		if e != nil {
			rerr = e
		}
		return true
	})
	if err != nil {
		return err
	}
	if errors.Is(rerr, unix.ECONNRESET) {
		return errClientGone
	}
	return rerr
}

// refuse ends a connection whose next request could not be read.
func (s *session) refuse(err error) {
	var ne net.Error
	status := phttp.Status(err)
	switch {
	case errors.Is(err, errClientGone), errors.Is(err, io.EOF):
		return
	case status == 0 && errors.As(err, &ne) && ne.Timeout():
		if s.end == s.start {
			// Idle too long between requests: a plain close.
			s.closeGracefully()
			return
		}
		status = 408
	case status == 0:
		s.logf().Debug("client read failed", "op", "relay", "err", err)
		return
	}
	s.logf().Info("request refused", "op", "relay", "status", status, "err", err)
	s.client.SetWriteDeadline(time.Now().Add(time.Second))
	s.client.Write(phttp.ErrorResponse(status, err.Error()))
	s.closeGracefully()
}

func (s *session) closeGracefully() { CloseGracefully(s.client, 5*time.Second) }

// CloseGracefully ends a connection from this side: FIN first, then read
// and drop whatever the client still sends until it closes too (or linger
// passes), so that unread bytes do not turn the close into a RST that could
// destroy the answer still in flight (nginx's lingering close). It does not
// close c.
func CloseGracefully(c *net.TCPConn, linger time.Duration) {
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(linger))
	var drain [512]byte
	for {
		if _, err := c.Read(drain[:]); err != nil {
			return
		}
	}
}

// plan says where the session's next request, for path, goes: here for a
// connection's first, and by the rules for a later one. It is made once
// per request, as a scheduler's choice among several BEs moves on with
// each call.
func (s *session) plan(path string) Plan {
	if !s.later() || s.r.cfg.Route == nil {
		return here
	}
	return Decide(s.r.cfg.Route(path))
}

// exchange relays one request and its response where plan says. It
// reports whether the client connection goes on to another request.
func (s *session) exchange(h *phttp.Head, plan Plan) (more bool, err error) {
	head := s.buf[s.start : s.start+h.Len]
	s.start += h.Len
	s.responded = false
	// The request's bytes toward the web server. `Connection: close` is
	// hop-by-hop (RFC 9110 section 7.6.1): dropped, it leaves the upstream
	// connection reusable; the relay closes the client's connection itself
	// once the response is through. Empty lines before the request line
	// are left out: the web server need not be as tolerant as we are.
	out := net.Buffers{head[h.Start:]}
	upKeep := h.KeepAlive || h.Proto == "HTTP/1.1" && h.ConnClose
	if !h.KeepAlive && upKeep {
		out = net.Buffers{head[h.Start:h.ConnLine[0]], head[h.ConnLine[1]:]}
	}
	if h.Upgrade {
		upKeep = false
	}
	// The part of the body already read.
	var rem int64
	var chunks *phttp.Chunks
	switch h.Body {
	case phttp.BodyLength:
		n := min(h.Length, int64(s.end-s.start))
		out = append(out, s.buf[s.start:s.start+int(n)])
		s.start += int(n)
		rem = h.Length - n
	case phttp.BodyChunked:
		chunks = &phttp.Chunks{}
		n, done, err := chunks.Scan(s.buf[s.start:s.end])
		if err != nil {
			s.answer(400, err.Error())
			return false, err
		}
		out = append(out, s.buf[s.start:s.start+n])
		s.start += n
		if done {
			chunks = nil
		}
	}
	bodySent := rem == 0 && chunks == nil
	pools, routed := []*Pool{nil}, !plan.Here
	if routed {
		pools = plan.Pools
	}
	s.routed, s.whole = routed, bodySent
	if err := s.sendRequest(out, bodySent && idempotent(h.Method), pools); err != nil {
		s.r.badGateway.Add(1)
		if routed {
			// Content of other BEs that none could serve: this request
			// gets a 503. The connection goes on if the request is whole
			// in hand and the client keeps it; with a body still to come
			// it cannot.
			s.logf().Info("forwarded request failed", "op", "forward", "path", h.Path, "err", err)
			if s.up != nil {
				// The connection the request failed on: no use to the next.
				s.up.Close()
				s.up = nil
			}
			if bodySent && h.KeepAlive && s.answerKeep(503, "no back end can serve this request now") {
				return true, nil
			}
			s.answer(503, "no back end can serve this request now")
			return false, nil
		}
		s.answer(502, "the web server is unreachable")
		return false, err
	}
	for {
		// Expect: 100-continue with the body still to come: the web
		// server answers first (nginx sends 100 as soon as it wants the
		// body); then the body goes.
		if !bodySent && !(h.Continue && !s.responded) {
			if err := s.sendBody(rem, chunks); err != nil {
				return false, err
			}
			bodySent = true
		}
		rh, err := s.readResponseHead(h.Method)
		if errors.Is(err, errAnsweredKeep) {
			return h.KeepAlive, nil
		}
		if err != nil {
			return false, err
		}
		if rh.Status < 200 && rh.Status != 101 {
			// Interim: to the client as is, then the next head.
			err := s.write(net.Buffers{s.up.head(rh)})
			s.up.br.Discard(rh.Len)
			if err != nil {
				return false, err
			}
			continue
		}
		if !bodySent {
			// A final answer instead of 100: the client may or may not send
			// its body now, so neither connection can be trusted after.
			upKeep, h.KeepAlive = false, false
		}
		s.after = afterBody{
			more:  h.KeepAlive && rh.KeepAlive && rh.Body != phttp.BodyClose && rh.Body != phttp.BodyTunnel,
			reuse: upKeep && rh.KeepAlive && rh.Body != phttp.BodyClose && rh.Body != phttp.BodyTunnel,
		}
		if err := s.relayResponse(rh, h); err != nil {
			return false, err
		}
		if rh.Body == phttp.BodyTunnel {
			return false, nil // both sockets ended with the tunnel
		}
		return s.endExchange(), nil
	}
}

// later tells whether the session's next request is a later one of its
// connection; the first is always this BE's, where the FE routed it.
func (s *session) later() bool { return s.count.Load() > 0 || s.resumed }

// step moves the session's state on ev (the BE's state machine).
func (s *session) step(ev conntab.Event) {
	from := conntab.State(s.state.Load())
	to, _, err := conntab.Step(conntab.BE, from, ev)
	if err != nil {
		s.logf().Error("connection state", "op", "migrate", "err", err)
		return
	}
	s.state.Store(uint32(to))
}

// move moves the connection to the BE its next request h belongs to, if
// plan says another BE takes it and connections move (phttp = multi), and
// says where the connection is: Gone from here, or Kept (or Local, when the
// FE says the request is this BE's after all) for the request to be served
// from here as plan says.
func (s *session) move(h *phttp.Head, plan Plan) Outcome {
	m := s.r.cfg.Mover
	if m == nil || !plan.Move || !m.Moving() {
		return Kept
	}
	// WILLHANDOFF: no further request is read; every response sent must
	// be acknowledged first, or the new BE could not retransmit it.
	start := time.Now()
	s.step(conntab.EvReschedule)
	ctx, cancel := context.WithTimeout(context.Background(), ackWait)
	out, err := Kept, m.Acked(ctx, s.client)
	cancel()
	acked := time.Since(start)
	if err == nil {
		s.step(conntab.EvHandoffStart)
		out, err = m.Move(s.client, s.buf[s.start:s.end])
	}
	switch {
	case out == Gone && err != nil:
		s.logf().Warn("connection reset: its migration's outcome is unknown", "op", "migrate", "path", h.Path, "err", err)
	case out == Gone:
		s.step(conntab.EvHandoffAcked)
		s.step(conntab.EvFEAcked)
		s.r.moves.Add(1)
		s.logf().Debug("connection moved", "op", "migrate", "path", h.Path, "acked", acked, "latency", time.Since(start))
	case out == Kept:
		s.logf().Info("connection not moved: the request is fetched from its BE's web server", "op", "migrate", "path", h.Path, "err", err)
	}
	if out == Gone {
		// The unserved bytes went with the connection.
		s.handOff, s.start = true, s.end
		s.release()
	} else {
		s.step(conntab.EvHandoffFailed)
	}
	if out == Kept || out == Gone && err != nil {
		s.r.moveFailures.Add(1)
	}
	return out
}

// endExchange returns the upstream connection to the pool or closes it,
// and says whether the client connection goes on.
func (s *session) endExchange() bool {
	if s.after.reuse {
		s.poolOf(s.up).Put(s.up)
	} else {
		s.up.Close()
	}
	s.up = nil
	return s.after.more
}

func idempotent(method string) bool {
	switch method {
	case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE":
		return true
	}
	return false
}

// poolOf is the pool up came from.
func (s *session) poolOf(up *Upstream) *Pool {
	if up.pool != nil {
		return up.pool
	}
	return s.r.cfg.Pool
}

// errAnsweredKeep: the request got an error answer and the client's
// connection goes on.
var errAnsweredKeep = errors.New("answered, connection kept")

// upstream makes s.up a connection to the first of pools that gives one
// (nil: the local web server); the pools after it are the fallback.
func (s *session) upstream(pools []*Pool) error {
	err := errors.New("no back end for this request")
	for i, p := range pools {
		s.fallback = pools[i+1:]
		if p == nil {
			p = s.r.cfg.Pool
		}
		if s.up != nil {
			if s.poolOf(s.up) == p {
				return nil
			}
			// The first request's connection, unused: back to its pool.
			s.poolOf(s.up).Put(s.up)
			s.up = nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		var up *Upstream
		up, err = p.Get(ctx)
		cancel()
		if err == nil {
			s.up = up
			return nil
		}
	}
	return err
}

// sendRequest writes the request's first bytes to an upstream connection
// of the first of pools that gives one (nil: the local web server), the
// session's own if it has one.
func (s *session) sendRequest(out net.Buffers, retryable bool, pools []*Pool) error {
	if err := s.upstream(pools); err != nil {
		return err
	}
	if s.unchecked {
		s.unchecked = false
		if closing(s.up.Conn) {
			// The web server closed the connection taken at the offer
			// (its check passed then): another, from the pool or dialed.
			// Nothing was sent; it counts as a retry.
			s.r.retries.Add(1)
			s.up.Close()
			s.up = nil
			if err := s.upstream(pools); err != nil {
				return err
			}
		}
	}
	s.retryable = retryable && s.up.idled
	s.sent = append(s.sent[:0], out...)
	bufs := append(net.Buffers(nil), out...)
	if _, err := bufs.WriteTo(s.up.Conn); err != nil {
		if !s.retryable {
			return err
		}
		return s.retry()
	}
	return nil
}

// retry sends the request again on a new connection. A connection that
// sat idle (pooled, or held from the offer) and that the server closed
// meanwhile shows only when its answer does not come if the close had not
// arrived when the session looked; a request that may be repeated
// (idempotent, and whole in hand) is then sent once more, as HAProxy's
// retry-on does. A new connection failing too gets 502.
func (s *session) retry() error {
	s.r.retries.Add(1)
	pool := s.poolOf(s.up)
	s.up.Close()
	s.up = nil
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	up, err := pool.Fresh(ctx)
	cancel()
	if err != nil && len(s.fallback) > 0 {
		// A forwarded request whose BE's web server is gone: the next.
		if err = s.upstream(s.fallback); err == nil {
			up, s.up = s.up, nil
		}
	}
	if err != nil {
		return err
	}
	s.up, s.retryable = up, false
	bufs := append(net.Buffers(nil), s.sent...)
	_, err = bufs.WriteTo(up.Conn)
	return err
}

// sendBody relays the rest of a request body from the client.
func (s *session) sendBody(rem int64, chunks *phttp.Chunks) error {
	if chunks == nil {
		if rem >= spliceMin {
			// splice(2). The client may be silent for IdleTimeout, as
			// between two reads below, however long the whole body
			// takes: the deadline moves on while bytes come.
			for {
				s.client.SetReadDeadline(time.Now().Add(s.r.cfg.IdleTimeout))
				n, err := s.up.Conn.ReadFrom(&io.LimitedReader{R: s.client, N: rem})
				rem -= n
				if n > 0 && rem > 0 && errors.Is(err, os.ErrDeadlineExceeded) {
					continue
				}
				return clientSide(err)
			}
		}
		for rem > 0 {
			s.client.SetReadDeadline(time.Now().Add(s.r.cfg.IdleTimeout))
			n, err := s.client.Read(s.buf[:min(int64(bufSize), rem)])
			if n > 0 {
				if _, werr := s.up.Conn.Write(s.buf[:n]); werr != nil {
					return werr
				}
				rem -= int64(n)
			}
			if err != nil {
				return clientSide(err)
			}
		}
		return nil
	}
	// Chunked: read, scan for the end, pass on what belongs to the body;
	// bytes after it are the next request's.
	s.start, s.end = 0, 0
	for {
		s.client.SetReadDeadline(time.Now().Add(s.r.cfg.IdleTimeout))
		n, err := s.client.Read(s.buf[s.end:])
		s.end += n
		if s.end > s.start {
			k, done, serr := chunks.Scan(s.buf[s.start:s.end])
			if serr != nil {
				return serr
			}
			if _, werr := s.up.Conn.Write(s.buf[s.start : s.start+k]); werr != nil {
				return werr
			}
			s.start += k
			if done {
				return nil
			}
			s.start, s.end = 0, 0
		}
		if err != nil {
			return clientSide(err)
		}
	}
}

var errClientAborted = errors.New("client went away in the middle of a request")

func clientSide(err error) error {
	if err != nil {
		return fmt.Errorf("%w: %v", errClientAborted, err)
	}
	return nil
}

// maxResponseHead bounds a response head from the web server (the upstream
// buffer).
const maxResponseHead = 16 << 10

// readResponseHead reads the next response head from the web server; it
// stays in the upstream buffer until relayed. An idled connection that
// fails before the first byte of the answer gets the request again, once,
// on a new connection.
func (s *session) readResponseHead(method string) (*phttp.Head, error) {
	for {
		h, err := s.peekHead(method)
		if err == nil {
			return h, nil
		}
		if s.retryable && !s.responded && s.up.br.Buffered() == 0 {
			if rerr := s.retry(); rerr == nil {
				continue
			}
		}
		s.r.badGateway.Add(1)
		if s.routed && s.whole && !s.responded {
			s.logf().Info("forwarded request failed", "op", "forward", "err", err)
			if s.up != nil { // nil: a failed retry dropped it already
				s.up.Close()
				s.up = nil
			}
			if s.answerKeep(503, "no back end can serve this request now") {
				return nil, errAnsweredKeep
			}
		}
		if !s.responded {
			s.answer(502, "the web server did not answer")
		}
		return nil, fmt.Errorf("read the web server's answer: %w", err)
	}
}

func (s *session) peekHead(method string) (*phttp.Head, error) {
	br := s.up.br
	for {
		// Everything buffered is parsed; only an incomplete head waits for
		// one more byte than that.
		if b, _ := br.Peek(br.Buffered()); len(b) > 0 {
			h, err := phttp.ParseResponse(b, method)
			if err == nil {
				return h, nil
			}
			if !errors.Is(err, phttp.ErrIncomplete) {
				return nil, err
			}
		}
		n := br.Buffered() + 1
		if n > maxResponseHead {
			return nil, fmt.Errorf("%w: response head over %d bytes", phttp.ErrMalformed, maxResponseHead)
		}
		if _, err := br.Peek(n); err != nil {
			return nil, err
		}
	}
}

// head returns the bytes of the response head h at the front of u's buffer.
func (u *Upstream) head(h *phttp.Head) []byte {
	b, _ := u.br.Peek(h.Len)
	return b
}

var connClose = []byte("Connection: close\r\n")

// relayResponse writes the final response head and its body to the client.
// When the client asked to close, the head says so: the relay kept the
// upstream connection open and ends the client's itself. The head stays in
// the upstream buffer, and goes out in one write with the body bytes
// buffered behind it.
func (s *session) relayResponse(rh, req *phttp.Head) error {
	head := s.up.head(rh)
	out := net.Buffers{head}
	if !req.KeepAlive && rh.KeepAlive && rh.Body != phttp.BodyTunnel {
		switch {
		case rh.ConnLine[1] > 0: // `Connection: keep-alive` becomes close
			out = net.Buffers{head[:rh.ConnLine[0]], connClose, head[rh.ConnLine[1]:]}
		default: // inserted before the blank line
			blank := 2
			if !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
				blank = 1
			}
			out = net.Buffers{head[:len(head)-blank], connClose, head[len(head)-blank:]}
		}
	}
	switch rh.Body {
	case phttp.BodyNone:
		err := s.write(out)
		s.up.br.Discard(rh.Len)
		return err
	case phttp.BodyLength:
		return s.relayLength(out, rh.Len, rh.Length)
	case phttp.BodyClose:
		return s.relayLength(out, rh.Len, -1)
	case phttp.BodyChunked:
		return s.relayChunked(out, rh.Len)
	case phttp.BodyTunnel:
		err := s.write(out)
		s.up.br.Discard(rh.Len)
		if err != nil {
			return err
		}
		s.tunnel()
	}
	return nil
}

// write sends bytes to the client; once any did, the exchange can only end
// by closing the connection if it fails.
func (s *session) write(out net.Buffers) error {
	s.responded = true
	if _, err := out.WriteTo(s.client); err != nil {
		return fmt.Errorf("%w: %v", errClientAborted, err)
	}
	return nil
}

// relayLength relays the head (headLen bytes at the front of the upstream
// buffer, rewritten as out) and n body bytes (n < 0: until the server
// closes): the buffered ones with the head in one write, the rest socket
// to socket.
func (s *session) relayLength(out net.Buffers, headLen int, n int64) error {
	br := s.up.br
	buffered := int64(br.Buffered() - headLen)
	if n >= 0 {
		buffered = min(buffered, n)
	}
	b, _ := br.Peek(headLen + int(buffered))
	err := s.write(append(out, b[headLen:]))
	br.Discard(headLen + int(buffered))
	if err != nil {
		return err
	}
	rem := n - buffered
	if n < 0 {
		rem = -1
	}
	return s.relayRest(rem)
}

// relayRest relays the rest of a body from the web server's socket, rem
// bytes (rem < 0: until the server closes). A handover stops it between
// two reads and exports what is left.
func (s *session) relayRest(rem int64) error {
	s.enterBody()
	defer s.leaveBody()
	for rem != 0 {
		if s.r.handing.Load() {
			return s.exportBody(rem, nil)
		}
		var copied int64
		var err error
		switch {
		case rem < 0:
			// splice(2) until the web server closes.
			copied, err = s.client.ReadFrom(s.up.Conn)
			if err == nil {
				return nil
			}
		case rem < spliceMin:
			copied, err = s.copySmall(&io.LimitedReader{R: s.up.Conn, N: rem})
		default:
			// splice(2) from the web server's socket to the client's.
			copied, err = s.client.ReadFrom(&io.LimitedReader{R: s.up.Conn, N: rem})
			if err == nil && copied == 0 {
				err = io.ErrUnexpectedEOF
			}
		}
		if rem > 0 {
			rem -= copied
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && s.r.handing.Load() {
				return s.exportBody(rem, nil)
			}
			if rem > 0 && !errors.Is(err, errClientAborted) {
				return fmt.Errorf("the web server's body ended %d bytes short: %w", rem, err)
			}
			return err
		}
	}
	return nil
}

// copySmall relays a short rest of a body through a buffer, returning how
// many bytes it relayed.
func (s *session) copySmall(lr *io.LimitedReader) (int64, error) {
	var tmp [8 << 10]byte
	var copied int64
	for lr.N > 0 {
		n, err := lr.Read(tmp[:])
		if n > 0 {
			if _, werr := s.client.Write(tmp[:n]); werr != nil {
				return copied, fmt.Errorf("%w: %v", errClientAborted, werr)
			}
			copied += int64(n)
		}
		if err != nil {
			return copied, err
		}
	}
	return copied, nil
}

// relayChunked relays the head (rewritten as out) and a chunked body
// through the upstream buffer, scanning the body for its end.
func (s *session) relayChunked(out net.Buffers, headLen int) error {
	return s.relayChunks(out, headLen, &phttp.Chunks{})
}

func (s *session) relayChunks(out net.Buffers, headLen int, c *phttp.Chunks) error {
	br := s.up.br
	skip := headLen // the head's bytes, still at the front of the buffer
	if skip == 0 {
		s.enterBody()
		defer s.leaveBody()
	}
	for {
		if skip == 0 && s.r.handing.Load() {
			return s.exportBody(0, c)
		}
		if br.Buffered() <= skip {
			if _, err := br.Peek(skip + 1); err != nil {
				if skip == 0 && errors.Is(err, os.ErrDeadlineExceeded) && s.r.handing.Load() {
					return s.exportBody(0, c)
				}
				return fmt.Errorf("the web server closed in the middle of a chunked body: %w", err)
			}
		}
		b, _ := br.Peek(br.Buffered())
		n, done, err := c.Scan(b[skip:])
		if err != nil {
			return err
		}
		werr := s.write(append(out, b[skip:skip+n]))
		br.Discard(skip + n)
		if werr != nil {
			return werr
		}
		if done {
			return nil
		}
		if skip > 0 {
			// The head is out: from here the body can go to a successor.
			out, skip = nil, 0
			s.enterBody()
			defer s.leaveBody()
		}
	}
}

// tunnel relays raw bytes both ways after a 101 or a CONNECT, until both
// directions end.
func (s *session) tunnel() {
	up := s.up
	if s.end > s.start {
		up.Conn.Write(s.buf[s.start:s.end])
		s.start = s.end
	}
	s.client.SetReadDeadline(time.Time{})
	if n := up.br.Buffered(); n > 0 {
		b, _ := up.br.Peek(n)
		s.client.Write(b)
		up.br.Discard(n)
	}
	s.up = nil
	Pipe(s.client, up.Conn)
}

// answerKeep answers the current request with status and keeps the
// connection open for the next; it reports whether the answer went out.
func (s *session) answerKeep(status int, why string) bool {
	if s.responded {
		return false
	}
	s.responded = true
	body := why + "\n"
	s.client.SetWriteDeadline(time.Now().Add(time.Second))
	defer s.client.SetWriteDeadline(time.Time{})
	_, err := fmt.Fprintf(s.client, "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s",
		status, http.StatusText(status), len(body), body)
	return err == nil
}

// answer sends an error response of the relay's own, if nothing of the
// response went out yet, saying that the connection closes.
func (s *session) answer(status int, why string) {
	if s.responded {
		return
	}
	s.responded = true
	s.client.SetWriteDeadline(time.Now().Add(time.Second))
	s.client.Write(phttp.ErrorResponse(status, why))
	s.client.SetWriteDeadline(time.Time{})
}
