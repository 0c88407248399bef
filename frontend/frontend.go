// Package frontend is the FE's handling of one client connection (seed
// 4.3): accept it, read its first request head, pick a BE by rule, hand the
// connection off, and when that cannot be done serve it on the local node
// (seed 4.7) or answer 503 — never leave it hanging.
//
// Slow clients cost little: a connection still sending its head holds a
// goroutine and a small buffer, not one of the maxclients slots that bound
// the work in progress (handoffs and local relays); the head has a deadline,
// and the connections from one client address still sending their heads
// are capped.
package frontend

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"tcpha/backends"
	"tcpha/handoff"
	"tcpha/handoff/repair"
	"tcpha/internal/accesslog"
	"tcpha/internal/gopool"
	"tcpha/internal/netaddr"
	"tcpha/metrics"
	"tcpha/phttp"
	"tcpha/relay"
)

// Config bounds the front end's work.
type Config struct {
	// MaxClients bounds the connections being handed off or served
	// locally at once (the seed's maxclients).
	MaxClients int
	// MaxHeads bounds the connections still sending their request head,
	// in total and from one client address (0: no per-address cap).
	MaxHeads, MaxHeadsPerSource int
	RequestTimeout              time.Duration
	MaxHeader                   int
	// Local is the local node's web server (seed 4.7).
	Local netip.AddrPort
	// Access, if set, hears of every connection with a request, once its
	// handoff (or local relay, or answer) is done ([global] accesslog);
	// nil costs nothing.
	Access func(accesslog.Entry)
}

// Migrator hands connections off (handoff.Sender).
type Migrator interface {
	Migrate(ctx context.Context, sock handoff.Socket, flow netip.AddrPort, consumed []byte, bes []netip.AddrPort) (netip.AddrPort, error)
	Keep(ctx context.Context, flow netip.AddrPort)
}

// Server serves the VIP's clients.
type Server struct {
	Config  Config
	Route   func(q backends.Request) backends.Route
	Sender  Migrator
	Metrics *metrics.Metrics
	Log     *slog.Logger

	initOnce sync.Once
	accepted chan struct{} // closed when Serve has stopped accepting
	slots    chan struct{}
	workers  *gopool.Pool
	heads    sync.Map // netip.Addr -> *atomic.Int64: heads being read per source
	reading  atomic.Int64
	wg       sync.WaitGroup

	// A handover takes the connections still sending their heads.
	hmu         sync.Mutex
	readingConn map[*net.TCPConn]struct{}
	handing     bool
	handedHeads []HandedHead

	counters Counters
	mu       sync.Mutex
}

// Counters are what `tcphactl status` reports for the FE's clients.
type Counters struct {
	Accepted, HandedOff, Local, Answered503      int64
	BadRequests, Timeouts, TooLarge, ClosedEarly int64
	RefusedBusy                                  int64 // closed at accept: too many heads being read
	HandoffLatencySum                            time.Duration
	HandoffLatencyCount                          int64
}

// Stats returns a copy of the counters.
func (s *Server) Stats() Counters {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counters
}

func (s *Server) count(f func(*Counters)) {
	s.mu.Lock()
	f(&s.counters)
	s.mu.Unlock()
}

// Serve accepts on ln until ctx is done. Each connection's work runs under
// work, so a handoff under way when the agent stops still completes; Serve
// returns once the connections it took are done.
func (s *Server) Serve(ctx, work context.Context, ln net.Listener) {
	s.ServeWithTLS(ctx, work, ln, nil)
}

// ServeWithTLS is Serve with a second listener, tlsLn (nil: none), whose
// connections open with a TLS ClientHello: the VIP's TLS port (tls.go).
func (s *Server) ServeWithTLS(ctx, work context.Context, ln, tlsLn net.Listener) {
	s.init()
	defer s.wg.Wait()
	// Handover waits for accepting to stop on both listeners before it
	// counts the connections at work.
	defer close(s.accepted)
	var loops sync.WaitGroup
	if tlsLn != nil {
		s.initTLS()
		loops.Go(func() {
			s.accept(ctx, tlsLn, func(tc *net.TCPConn, client netip.AddrPort) {
				s.serveTLS(work, tc, client, time.Now().Add(s.Config.RequestTimeout))
			})
		})
	}
	s.accept(ctx, ln, func(tc *net.TCPConn, client netip.AddrPort) {
		s.serve(work, tc, client, nil, time.Now().Add(s.Config.RequestTimeout))
	})
	loops.Wait()
}

// accept accepts on ln until ctx is done, running serve for each
// connection the caps let in.
func (s *Server) accept(ctx context.Context, ln net.Listener, serve func(*net.TCPConn, netip.AddrPort)) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	backoff := time.Duration(0)
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and the like: wait and go on accepting.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.Log.Warn("accept", "op", "accept", "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		tc := c.(*net.TCPConn)
		client := netaddr.AddrPort(tc.RemoteAddr())
		if !s.takeHead(client.Addr()) {
			// Past the caps the connection is closed at once: better than
			// letting the slow ones make everyone wait.
			s.count(func(c *Counters) { c.RefusedBusy++ })
			tc.SetLinger(0)
			tc.Close()
			continue
		}
		s.count(func(c *Counters) { c.Accepted++ })
		s.wg.Add(1)
		s.workers.Go(func() {
			defer s.wg.Done()
			serve(tc, client)
		})
	}
}

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.slots = make(chan struct{}, max(s.Config.MaxClients, 1))
		s.workers = gopool.New(64)
		s.readingConn = map[*net.TCPConn]struct{}{}
		s.accepted = make(chan struct{})
	})
}

// HandedHead is a connection that was still sending its request head when
// the agent handed over to a successor.
type HandedHead struct {
	Conn *net.TCPConn
	// Read is the head's start, already read; Deadline is when the whole
	// head must be in.
	Read     []byte
	Deadline time.Time
}

// Handover takes the connections still sending their heads away from
// their goroutines, with what they have read, and waits for the rest of
// the work (handoffs under way, local relays) to end, or for ctx. Accepting
// has stopped: Serve's ctx is done.
func (s *Server) Handover(ctx context.Context) []HandedHead {
	s.init()
	s.hmu.Lock()
	s.handing = true
	for c := range s.readingConn {
		c.SetReadDeadline(time.Unix(1, 0))
	}
	s.hmu.Unlock()
	done := make(chan struct{})
	go func() {
		// The last connection accepted must be counted before the wait.
		select {
		case <-s.accepted:
		case <-ctx.Done():
		}
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.Log.Warn("handover: connections still at work stay with this process", "op", "upgrade")
	}
	s.hmu.Lock()
	defer s.hmu.Unlock()
	s.handing = false
	out := s.handedHeads
	s.handedHeads = nil
	return out
}

// Resume serves a connection a predecessor handed over from where its head
// stood, under work.
func (s *Server) Resume(work context.Context, h HandedHead) {
	s.init()
	client := netaddr.AddrPort(h.Conn.RemoteAddr())
	s.reading.Add(1)
	if s.Config.MaxHeadsPerSource > 0 {
		v, _ := s.heads.LoadOrStore(client.Addr(), new(atomic.Int64))
		v.(*atomic.Int64).Add(1)
	}
	s.wg.Add(1)
	s.workers.Go(func() {
		defer s.wg.Done()
		s.serve(work, h.Conn, client, h.Read, h.Deadline)
	})
}

// readingHead tracks c while its head is being read; a handover under way
// interrupts the read at once.
func (s *Server) readingHead(c *net.TCPConn, reading bool) {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if !reading {
		delete(s.readingConn, c)
		return
	}
	s.readingConn[c] = struct{}{}
	if s.handing {
		c.SetReadDeadline(time.Unix(1, 0))
	}
}

// handHead gives c up to a handover under way, if one is.
func (s *Server) handHead(c *net.TCPConn, read []byte, deadline time.Time) bool {
	s.hmu.Lock()
	defer s.hmu.Unlock()
	if !s.handing {
		return false
	}
	s.handedHeads = append(s.handedHeads, HandedHead{Conn: c, Read: read, Deadline: deadline})
	return true
}

// takeHead counts a connection in as reading its head, unless a cap says
// no.
func (s *Server) takeHead(src netip.Addr) bool {
	if s.Config.MaxHeads > 0 && s.reading.Load() >= int64(s.Config.MaxHeads) {
		return false
	}
	if s.Config.MaxHeadsPerSource > 0 {
		v, _ := s.heads.LoadOrStore(src, new(atomic.Int64))
		if n := v.(*atomic.Int64).Add(1); n > int64(s.Config.MaxHeadsPerSource) {
			v.(*atomic.Int64).Add(-1)
			return false
		}
	}
	s.reading.Add(1)
	return true
}

func (s *Server) headDone(src netip.Addr) {
	s.reading.Add(-1)
	if s.Config.MaxHeadsPerSource > 0 {
		if v, ok := s.heads.Load(src); ok && v.(*atomic.Int64).Add(-1) == 0 {
			s.heads.CompareAndDelete(src, v)
		}
	}
}

// serve handles one client connection: read its first request within the
// limits, then hand it off, serve it locally, or answer with an error.
func (s *Server) serve(ctx context.Context, c *net.TCPConn, client netip.AddrPort, read []byte, deadline time.Time) {
	var e *accesslog.Entry
	if s.Config.Access != nil {
		// The connection's line, written when serve returns.
		e = &accesslog.Entry{Time: time.Now(), Role: accesslog.FE, Client: client}
		defer func() {
			if e.Served != "" {
				e.Total = time.Since(e.Time)
				s.Config.Access(*e)
			}
		}()
	}
	c.SetReadDeadline(deadline)
	s.readingHead(c, true)
	req, read, err := phttp.ReadFrom(c, read, s.Config.MaxHeader)
	s.readingHead(c, false)
	s.headDone(client.Addr())
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) && s.handHead(c, read, deadline) {
			return
		}
		s.refuse(c, client, err, e)
		return
	}
	if e != nil {
		e.Host, e.Method, e.Target = req.Host, req.Method, req.Target
	}
	c.SetReadDeadline(time.Time{})
	// Only now does the connection take a slot of the work in progress.
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		s.answer(c, 503, "the front end is stopping", e)
		return
	}
	defer func() { <-s.slots }()

	route := s.Route(backends.Request{Host: req.Host, Path: req.Path})
	local := route.Local
	if len(route.BEs) > 0 {
		start := time.Now()
		be, err := s.Sender.Migrate(ctx, repair.Socket{Conn: c}, client, req.Raw, route.BEs)
		if err == nil {
			lat := time.Since(start)
			s.Metrics.ObserveHandoff(lat)
			s.count(func(c *Counters) { c.HandedOff++; c.HandoffLatencySum += lat; c.HandoffLatencyCount++ })
			s.Log.Debug("handed off", "op", "handoff", "client", client.String(), "path", req.Path,
				"be", be.Addr().String(), "latency", lat)
			if e != nil {
				e.Served, e.BE, e.Latency = accesslog.Handoff, be.Addr().String(), lat
			}
			return
		}
		s.Log.Info("handoff failed; FE keeps the connection", "op", "handoff", "client", client.String(),
			"path", req.Path, "err", err)
		if !s.handoffFailed(err) {
			local = false // the connection may not be usable: answer, do not relay
		}
	}
	if local {
		s.Sender.Keep(ctx, client)
		s.serveLocal(c, client, req, e)
		return
	}
	s.Metrics.Handoffs.WithLabelValues("503").Inc()
	s.answer(c, 503, "no back end available for "+req.Path, e)
}

// handoffFailed counts a handoff that did not happen by its reason and
// tells whether the connection is still the FE's to serve: no BE took it,
// or the table was full, before anything changed; after any other error
// the socket may be half moved.
func (s *Server) handoffFailed(err error) (usable bool) {
	switch {
	case errors.Is(err, handoff.ErrNoBE):
		s.Metrics.Handoffs.WithLabelValues("no-be").Inc()
	case errors.Is(err, handoff.ErrTableFull):
		s.Metrics.Handoffs.WithLabelValues("table-full").Inc()
	default:
		s.Metrics.Handoffs.WithLabelValues("error").Inc()
		return false
	}
	return true
}

// refuse answers a connection whose head could not be read: 400, 408 or
// 431, or nothing for a client that went away.
func (s *Server) refuse(c *net.TCPConn, client netip.AddrPort, err error, e *accesslog.Entry) {
	status := phttp.Status(err)
	var ne net.Error
	switch {
	case status == 400:
		s.count(func(c *Counters) { c.BadRequests++ })
	case status == 431:
		s.count(func(c *Counters) { c.TooLarge++ })
	case errors.As(err, &ne) && ne.Timeout():
		s.count(func(c *Counters) { c.Timeouts++ })
		status = 408
	default: // the client went away
		s.count(func(c *Counters) { c.ClosedEarly++ })
		s.Log.Debug("client closed before a request", "op", "read", "client", client.String(), "err", err)
		c.Close()
		return
	}
	// Beside "503": tcpha_handoffs_total counts every connection the FE
	// finished with, and these are the ones that never had a request.
	s.Metrics.Handoffs.WithLabelValues(strconv.Itoa(status)).Inc()
	s.Log.Info("request refused", "op", "read", "client", client.String(), "status", status, "err", err)
	s.answer(c, status, err.Error(), e)
}

// answer sends an error response and closes the connection gracefully:
// what the client sent and was not read (the rest of an oversized head,
// a body) would otherwise turn the close into a RST and lose the answer.
// e, if not nil, is the connection's access log entry.
func (s *Server) answer(c *net.TCPConn, status int, why string, e *accesslog.Entry) {
	if status == 503 {
		s.count(func(c *Counters) { c.Answered503++ })
	}
	c.SetWriteDeadline(time.Now().Add(time.Second))
	n, _ := c.Write(phttp.ErrorResponse(status, why))
	if e != nil {
		e.Served, e.Status, e.Bytes = accesslog.Answered, status, int64(n)
	}
	relay.CloseGracefully(c, time.Second)
	c.Close()
}

// serveLocal relays the connection to the FE's own web server (the seed's
// local node, 4.7).
func (s *Server) serveLocal(c *net.TCPConn, client netip.AddrPort, req *phttp.Request, e *accesslog.Entry) {
	up, err := net.DialTimeout("tcp4", s.Config.Local.String(), time.Second)
	if err != nil {
		s.Log.Warn("local node unreachable", "op", "local", "client", client.String(), "err", err)
		s.answer(c, 503, "local server unreachable", e)
		return
	}
	if _, err := up.Write(req.Raw[req.Head.Start:]); err != nil { // without empty lines before the request line
		up.Close()
		c.Close()
		return
	}
	s.count(func(c *Counters) { c.Local++ })
	s.Metrics.Handoffs.WithLabelValues("local").Inc()
	s.Log.Debug("served by local node", "op", "local", "client", client.String(), "path", req.Path)
	if e != nil {
		// Relayed raw, later requests too: the line is the connection's,
		// without a status or a byte count.
		e.Served, e.BE = accesslog.Local, s.Config.Local.String()
	}
	relay.Pipe(c, up.(*net.TCPConn))
}
