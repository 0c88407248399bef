// Package ctl is tcpha's control channel: multiplexed, authenticated
// sessions between an FE and its BEs, and between BEs (seed 2, "Connection
// Management Module": persistent connections shared by many handoffs).
//
// A session starts with a handshake that proves both ends hold the cluster
// secret and binds the session to a fresh nonce from each (handshake.go).
// After it, one reader goroutine dispatches frames by id — answers to the
// requests this end made, new requests from the peer to a Handler — and
// one writer goroutine serialises frames, batching those that queue up into
// one write. Any number of handoffs share a session; one that is slow holds
// up nobody else. The dialing side keeps connperbe sessions per peer open in
// the background (Pool); the accepting side bounds what strangers can cost
// it (Server).
package ctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"tcpha/handoff/wire"
	"tcpha/internal/netaddr"
)

// Handler serves the requests a peer starts on a session.
type Handler interface {
	// Serve is called on the session's reader goroutine for every frame
	// that is not an answer to this end's own request (except probes and
	// goaways, which the session handles). It must not block: long work
	// runs in its own goroutine and answers with Session.Reply.
	Serve(s *Session, f wire.Frame)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(*Session, wire.Frame)

// Serve implements Handler.
func (h HandlerFunc) Serve(s *Session, f wire.Frame) { h(s, f) }

// Config is what an end needs to run sessions.
type Config struct {
	// Secret is the cluster key; nil runs sessions without authentication
	// (only the member address check protects them, which trusts every
	// local user of a member's host: the agent's config therefore requires
	// a secret, and nil is left to tests and the fuzz target).
	Secret []byte
	// Local is this end's Hello; its nonce is filled for each session.
	Local wire.Hello
	// Handler serves the peer's requests; nil refuses them.
	Handler Handler
	// Health answers the peer's probes (nil: a probe gets an empty reply),
	// given the probe's payload: the check an FE asks for, empty in a
	// keepalive. It runs on the reader goroutine and must not block.
	Health func(probe []byte) wire.Health
	Log    *slog.Logger

	// HandshakeTimeout bounds the whole handshake, connect included on
	// the dialing end; default 2 s. A genuine handshake takes one round
	// trip after the connect (under a millisecond between the test
	// cluster's namespaces); the bound is what a stalled stranger holds an
	// accepting end's slot for.
	HandshakeTimeout time.Duration
	WriteTimeout     time.Duration // one write to the peer; default 5 s
	// KeepAlive is how long a dialing end waits without receiving a frame
	// before it probes the peer, which then has twice that to answer;
	// default 10 s. The accepting end declares a session dead after three
	// times that without a frame.
	KeepAlive time.Duration
}

func (c *Config) handshakeTimeout() time.Duration {
	return orDefault(c.HandshakeTimeout, 2*time.Second)
}
func (c *Config) writeTimeout() time.Duration { return orDefault(c.WriteTimeout, 5*time.Second) }
func (c *Config) keepAlive() time.Duration    { return orDefault(c.KeepAlive, 10*time.Second) }

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// Errors of a session.
var (
	ErrClosed    = errors.New("control session closed")
	ErrGoingAway = errors.New("control session going away")
	// ErrNotSent: Call failed before its request left, so the peer never
	// saw it.
	ErrNotSent = errors.New("request not sent")
)

// Session is one authenticated control connection.
type Session struct {
	cfg    *Config
	conn   net.Conn
	br     *bufio.Reader
	rd     wire.Reader
	wkey   *wire.Keyed
	dialer bool
	// Peer is the other end's Hello; Remote its address as the kernel sees
	// it.
	Peer   wire.Hello
	Remote netip.AddrPort
	log    *slog.Logger

	out      chan wire.Frame
	done     chan struct{}
	loops    sync.WaitGroup // reader, writer, keepalive
	closeOne sync.Once
	errMu    sync.Mutex
	err      error

	nextID  atomic.Uint64
	mu      sync.Mutex
	pending map[uint64]chan wire.Frame
	// inflight counts this end's unanswered requests, so a pool can pick
	// the least loaded session.
	inflight atomic.Int64
	lastRead atomic.Int64 // unix nanoseconds of the last frame received

	// A goaway retires the session without losing a request (see GoAway).
	goAway     atomic.Bool
	goAwayCh   chan struct{} // closed when the peer's goaway arrives
	goAwayOnce sync.Once
	sentGoAway atomic.Bool
	// serving counts the peer's requests handed to the Handler and not
	// yet answered: a session retires only once they are, or the peer's
	// Call would fail on a goaway that crossed its answer.
	serving atomic.Int64
	holds   int  // under mu: work begun on this session, not yet ended
	retired bool // under mu: no new holds
}

func newSession(cfg *Config, conn net.Conn, br *bufio.Reader, dialer bool) *Session {
	s := &Session{
		cfg: cfg, conn: conn, br: br, dialer: dialer,
		out:      make(chan wire.Frame, 256),
		done:     make(chan struct{}),
		goAwayCh: make(chan struct{}),
		pending:  map[uint64]chan wire.Frame{},
	}
	s.Remote = netaddr.AddrPort(conn.RemoteAddr())
	s.log = cfg.Log.With("peer", s.Remote.String())
	return s
}

// start runs the reader and writer once the handshake is done.
func (s *Session) start() {
	s.lastRead.Store(time.Now().UnixNano())
	s.loops.Go(s.writeLoop)
	s.loops.Go(s.readLoop)
	if s.dialer {
		s.loops.Go(s.keepAliveLoop)
	}
}

// Wait returns once the session has ended and its goroutines have exited:
// whatever its handler started from the reader has been started.
func (s *Session) Wait() {
	<-s.done
	s.loops.Wait()
}

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err says why the session ended (nil while it runs).
func (s *Session) Err() error {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.err
}

// Inflight is how many of this end's requests wait for an answer.
func (s *Session) Inflight() int64 { return s.inflight.Load() }

// GoingAway says the peer asked for no new requests on this session.
func (s *Session) GoingAway() bool { return s.goAway.Load() }

// SentGoAway tells whether this end told the peer it goes away (Drain): a
// request sent now may cross the peer's answer to it and be cut.
func (s *Session) SentGoAway() bool { return s.sentGoAway.Load() }

// GoingAwayCh is closed when the peer asks for no new requests.
func (s *Session) GoingAwayCh() <-chan struct{} { return s.goAwayCh }

// Hold marks the start of work that needs this session beyond one call (an
// offer, until its commit or abort is sent), so that a retiring session is
// not given up under it. It fails once the session retires.
func (s *Session) Hold() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.retired {
		return false
	}
	s.holds++
	return true
}

// Unhold ends what Hold began.
func (s *Session) Unhold() {
	s.mu.Lock()
	s.holds--
	s.mu.Unlock()
}

// retire takes no more holds if none is held and no call waits, and says
// whether it did.
func (s *Session) retire() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.holds > 0 || s.inflight.Load() > 0 || s.serving.Load() > 0 {
		return false
	}
	s.retired = true
	return true
}

// Close ends the session; requests waiting on it fail. It is idempotent.
func (s *Session) Close() { s.fail(ErrClosed) }

func (s *Session) fail(err error) {
	s.closeOne.Do(func() {
		s.errMu.Lock()
		s.err = err
		s.errMu.Unlock()
		close(s.done)
		s.conn.Close()
	})
}

// Send queues a frame for the writer. It fails only when the session has
// ended.
func (s *Session) Send(f wire.Frame) error {
	select {
	case s.out <- f:
		return nil
	case <-s.done:
		return fmt.Errorf("send %s to %v: %w", f.Type, s.Remote, s.Err())
	}
}

// Reply answers the peer's request req.
func (s *Session) Reply(req wire.Frame, f wire.Frame) error {
	f.ID = req.ID
	err := s.Send(f)
	if req.Type.Answered() {
		s.serving.Add(-1)
	}
	return err
}

// GoAway tells the peer to start no new requests on this session; the
// ones under way finish. A session retires in two steps, so that no request
// is lost: the end going away (a BE handing over to its successor) sends a
// goaway; the peer stops starting work on the session, finishes what it
// began, and answers with a goaway of its own (Retire); the first end reads
// that answer after every frame the peer sent before it, and closes.
func (s *Session) GoAway() error {
	s.sentGoAway.Store(true)
	return s.Send(wire.Frame{Type: wire.TypeGoAway})
}

// Retire answers the peer's goaway once nothing runs on the session, or
// after d at most, and waits up to d more for the peer to close. It closes
// the session in any case.
func (s *Session) Retire(d time.Duration) {
	defer s.Close()
	deadline := time.Now().Add(d)
	for !s.retire() {
		if time.Now().After(deadline) {
			s.log.Warn("retiring a control session with work under way", "op", "control",
				"holds", s.holdCount(), "inflight", s.inflight.Load())
			return
		}
		select {
		case <-s.done:
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
	if s.Send(wire.Frame{Type: wire.TypeGoAway}) != nil {
		return
	}
	select {
	case <-s.done:
	case <-time.After(d):
	}
}

func (s *Session) holdCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.holds
}

// Call sends a request and waits for its answer, for ctx or for the
// session's end, whichever comes first.
func (s *Session) Call(ctx context.Context, f wire.Frame) (wire.Frame, error) {
	// Dialers number their requests odd, acceptors even: the reader tells
	// answers from new requests by the id alone.
	id := s.nextID.Add(1) * 2
	if s.dialer {
		id--
	}
	f.ID = id
	ch := make(chan wire.Frame, 1)
	s.mu.Lock()
	s.pending[id] = ch
	s.mu.Unlock()
	s.inflight.Add(1)
	defer func() {
		s.inflight.Add(-1)
		s.mu.Lock()
		delete(s.pending, id)
		s.mu.Unlock()
	}()
	if err := s.Send(f); err != nil {
		return wire.Frame{}, fmt.Errorf("%w: %w", ErrNotSent, err)
	}
	select {
	case r := <-ch:
		return r, nil
	case <-ctx.Done():
		return wire.Frame{}, fmt.Errorf("%s to %v: %w", f.Type, s.Remote, ctx.Err())
	case <-s.done:
		return wire.Frame{}, fmt.Errorf("%s to %v: %w", f.Type, s.Remote, s.Err())
	}
}

// mine tells whether id numbers a request this end made.
func (s *Session) mine(id uint64) bool {
	odd := id%2 == 1
	return odd == s.dialer
}

// maxBatch bounds one write of queued frames.
const maxBatch = 256 << 10

func (s *Session) writeLoop() {
	var buf []byte
	for {
		var f wire.Frame
		select {
		case f = <-s.out:
		case <-s.done:
			return
		}
		var err error
		buf, err = wire.AppendFrame(buf[:0], f, s.wkey)
		// Frames that queued while the last write ran go in the same write.
	batch:
		for err == nil && len(buf) < maxBatch {
			select {
			case f = <-s.out:
				buf, err = wire.AppendFrame(buf, f, s.wkey)
			default:
				break batch
			}
		}
		if err != nil {
			s.fail(fmt.Errorf("encode: %w", err))
			return
		}
		s.conn.SetWriteDeadline(time.Now().Add(s.cfg.writeTimeout()))
		if _, err := s.conn.Write(buf); err != nil {
			s.fail(fmt.Errorf("write: %w", err))
			return
		}
		if cap(buf) > maxBatch*2 {
			buf = nil // one huge frame: do not keep its buffer
		}
	}
}

func (s *Session) readLoop() {
	// The accepting end relies on the dialer's probes: three keepalives of
	// silence end the session. The dialing end probes after one and waits
	// two for the answer; its own deadline is only a backstop.
	idle := 3 * s.cfg.keepAlive()
	if s.dialer {
		idle = 4 * s.cfg.keepAlive()
	}
	for {
		s.conn.SetReadDeadline(time.Now().Add(idle))
		f, err := s.rd.Read()
		if err != nil {
			s.fail(fmt.Errorf("read: %w", err))
			return
		}
		s.lastRead.Store(time.Now().UnixNano())
		if f.Type == wire.TypeGoAway { // id 0: neither end's request
			if s.sentGoAway.Load() {
				// The peer's answer to ours: everything it sent before it
				// has been served.
				s.fail(ErrGoingAway)
				return
			}
			s.goAway.Store(true)
			s.goAwayOnce.Do(func() { close(s.goAwayCh) })
			continue
		}
		if s.mine(f.ID) {
			s.mu.Lock()
			ch := s.pending[f.ID]
			s.mu.Unlock()
			select {
			case ch <- f: // buffered: the first answer always fits
			default:
				s.log.Debug("answer to no waiting request", "op", "control", "type", f.Type.String(), "id", f.ID)
			}
			continue
		}
		switch f.Type {
		case wire.TypeProbe:
			var h wire.Health
			if s.cfg.Health != nil {
				h = s.cfg.Health(f.Payload)
			}
			p, _ := h.MarshalBinary()
			s.Reply(f, wire.Frame{Type: wire.TypeProbeReply, Payload: p})
		default:
			if f.Type.Answered() {
				s.serving.Add(1) // Reply takes it off
			}
			if s.cfg.Handler == nil {
				s.log.Warn("request refused: this end serves none", "op", "control", "type", f.Type.String())
				s.Reply(f, AckFrame(wire.ResultInvalid, "this agent serves no requests"))
				continue
			}
			s.cfg.Handler.Serve(s, f)
		}
	}
}

// keepAliveLoop probes an idle session, so a peer that vanished without a
// FIN (power loss, a cut cable) is noticed and the session redialed.
func (s *Session) keepAliveLoop() {
	ka := s.cfg.keepAlive()
	t := time.NewTimer(ka)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		since := time.Since(time.Unix(0, s.lastRead.Load()))
		if since < ka {
			t.Reset(ka - since)
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*ka)
		_, err := s.Call(ctx, wire.Frame{Type: wire.TypeProbe})
		cancel()
		if err != nil {
			s.fail(fmt.Errorf("keepalive: %w", err))
			return
		}
		t.Reset(ka)
	}
}

// AckFrame returns an Ack frame with result r.
func AckFrame(r wire.Result, reason string) wire.Frame {
	p, _ := wire.Ack{Result: r, Reason: reason}.MarshalBinary()
	return wire.Frame{Type: wire.TypeAck, Payload: p}
}
