package relay

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"tcpha/handoff/conntab"
	"tcpha/internal/accesslog"
	"tcpha/internal/netaddr"
	"tcpha/phttp"
)

// bufSize is a session's client buffer: a request head, the start of its
// body, and pipelined requests behind it.
const bufSize = 16 << 10

var bufs = sync.Pool{New: func() any { return new([bufSize]byte) }}

// session is one client connection, for as long as this relay serves it.
// It holds what lasts across requests: the client's socket and the bytes
// read from it and not yet relayed, the counts and state others read, and
// where a handover finds it. What belongs to one request is an exchange.
type session struct {
	r *Relay
	// count is the requests this session relayed (tcphactl conns reads
	// it); resumed says a predecessor relayed the connection's first.
	count   atomic.Int32
	resumed bool
	// accepted says this BE accepted the connection itself (accept =
	// be): its first request is routed here, not by an FE.
	accepted bool
	// state is the connection's conntab.State (the BE's states of seed
	// 4.8.2).
	state  atomic.Uint32
	since  time.Time
	client *net.TCPConn
	buf    *[bufSize]byte
	max    int // head bound, within buf
	start  int // buf[start:end] is read and not yet relayed
	end    int
	// held is the upstream connection taken when the handoff was accepted,
	// until the first request's exchange takes it.
	held *Upstream
	log  *slog.Logger

	// For a handover: where the session is, the upstream connection a
	// kick must interrupt, and whether the sockets went to a successor
	// (or, moved, to another BE).
	phase   atomic.Int32
	kickUp  atomic.Pointer[net.TCPConn]
	handOff bool
}

func (r *Relay) serve(client *net.TCPConn, first *Upstream) {
	s := r.newSession(client)
	if first != nil {
		// Taken when the handoff was accepted and held since: looked at
		// again before the request goes into it, and retried like a
		// pooled one (Upstream.idled).
		first.idled, s.held = true, first
	}
	defer s.finish()
	s.loop()
}

func (r *Relay) newSession(client *net.TCPConn) *session {
	s := &session{r: r, client: client, max: min(r.cfg.MaxHeader, bufSize), since: time.Now()}
	s.state.Store(uint32(conntab.Established))
	r.mu.Lock()
	if r.sessions == nil {
		r.sessions = map[*session]struct{}{}
	}
	r.sessions[s] = struct{}{}
	r.mu.Unlock()
	return s
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
		var start time.Time
		if s.r.cfg.Access != nil {
			start = time.Now()
		}
		plan := planFor(s.later(), s.r.cfg.Route, h.Host, h.Path)
		if s.accepted && !s.later() && s.r.cfg.RouteFirst != nil {
			plan = Decide(s.r.cfg.RouteFirst(h.Host, h.Path))
		}
		out, moveLat := s.move(h, plan)
		if out == Gone {
			s.logMove(h, start, moveLat)
			return
		}
		if out == Local {
			plan = here
		}
		s.r.requests.Add(1)
		x := &exchange{req: h, up: s.held, unchecked: s.held != nil, start: start, moveLat: moveLat}
		s.held = nil
		more, err := s.serveRequest(x, plan)
		s.r.bytesOut.Add(x.bytes)
		s.count.Add(1)
		x.drop()
		if errors.Is(err, errHandedOff) {
			// The response goes on in the successor, which does not log
			// it: the access log misses this one request.
			return
		}
		s.logExchange(x)
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

// later tells whether the session's next request is a later one of its
// connection; the first is always this BE's, where the FE routed it.
func (s *session) later() bool { return s.count.Load() > 0 || s.resumed }

// clientAddr is the client's address and port.
func (s *session) clientAddr() netip.AddrPort { return netaddr.AddrPort(s.client.RemoteAddr()) }

// logExchange writes x's access log line, if there is an access log.
func (s *session) logExchange(x *exchange) {
	if s.r.cfg.Access == nil {
		return
	}
	e := s.entry(x.req, x.start)
	e.Status, e.Bytes, e.Latency = x.status, x.bytes, x.moveLat
	switch {
	case x.answered:
		e.Served = accesslog.Answered
	case x.pool == nil || x.pool == s.r.cfg.Pool:
		e.Served = accesslog.Here
	default:
		e.Served, e.BE = accesslog.Forward, x.pool.Name
	}
	s.r.cfg.Access(e)
}

// logMove writes the access log line of a request for which the
// connection moved to another BE (the BE that serves it logs it too).
func (s *session) logMove(h *phttp.Head, start time.Time, lat time.Duration) {
	if s.r.cfg.Access == nil {
		return
	}
	e := s.entry(h, start)
	e.Served, e.Latency = accesslog.Move, lat
	s.r.cfg.Access(e)
}

// entry is an access log entry for request h, read at start.
func (s *session) entry(h *phttp.Head, start time.Time) accesslog.Entry {
	e := accesslog.Entry{Time: start, Role: accesslog.BE, Client: s.clientAddr(), Total: time.Since(start)}
	if h != nil {
		e.Host, e.Method, e.Target = h.Host, h.Method, h.Target
	}
	return e
}

func (s *session) logf() *slog.Logger {
	if s.log == nil {
		s.log = s.r.cfg.Log.With("client", s.client.RemoteAddr().String())
	}
	return s.log
}

// finish closes what is left: the client's connection, and the upstream
// connection taken at the handoff if no request used it. Sockets handed to
// a successor are its own.
func (s *session) finish() {
	s.r.mu.Lock()
	delete(s.r.sessions, s)
	s.r.mu.Unlock()
	if s.handOff {
		return
	}
	if s.held != nil {
		s.held.Close()
		s.held = nil
	}
	s.client.Close()
	s.release()
}

// release gives the client buffer back when it holds nothing unread.
func (s *session) release() {
	if s.buf != nil && s.start == s.end {
		bufs.Put(s.buf)
		s.buf, s.start, s.end = nil, 0, 0
	}
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

// forwardedFor is the address X-Forwarded-For carries for this session's
// requests; the zero Addr when the relay adds none.
func (s *session) forwardedFor() netip.Addr {
	if !s.r.cfg.ForwardedFor {
		return netip.Addr{}
	}
	ap, err := netip.ParseAddrPort(s.client.RemoteAddr().String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}
