package relay

import (
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"tcpha/handoff/conntab"
	"tcpha/internal/accesslog"
	"tcpha/internal/gopool"
)

// The relay's files, by job: relay.go the Relay and what others see of it;
// session.go a connection's life; head.go reading its request heads;
// exchange.go one request and its response; rewrite.go the bytes changed
// on their way; choice.go which web server, and retries; pump.go bodies
// both ways; move.go moves to other BEs; handover.go handing sessions to a
// successor.

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
	Route func(host, path string) Rules
	// RouteFirst says what the rules say of the first request of a
	// connection this BE accepted itself ([fe] accept = be,
	// ServeAccepted): no FE routed it, so it is routed here, and moved
	// when it is another BE's whatever phttp says.
	RouteFirst func(host, path string) Rules
	// ForwardedFor adds the client's address to each request's
	// X-Forwarded-For ([be] forwardedfor): the web server's peer is the
	// relay, 127.0.0.1.
	ForwardedFor bool
	// Mover, if set, moves a connection whose next request belongs to
	// other BEs to the right BE itself, while Mover.Moving says so (phttp
	// = multi); the plan's pools then serve only a request whose move
	// failed.
	Mover Mover
	// Access, if set, hears of every request the relay serves, moves or
	// answers itself ([global] accesslog); nil costs nothing.
	Access func(accesslog.Entry)
}

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
	// bytesIn are the clients' request bytes passed to web servers,
	// bytesOut the bytes sent to clients (responses and the relay's own
	// answers), counted per exchange.
	bytesIn, bytesOut atomic.Int64

	// handing is set while the relay hands its sessions to a successor
	// (handover.go); sessions register so that they can be kicked.
	handing  atomic.Bool
	mu       sync.Mutex
	sessions map[*session]struct{}
	pipes    map[*tlsPipe]struct{} // TLS connections (tls.go)
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
	// BytesIn and BytesOut are the HTTP bytes from and to clients.
	BytesIn, BytesOut int64
	Upstream          PoolStats
}

// Stats returns the relay's counters.
func (r *Relay) Stats() Stats {
	return Stats{Active: r.Active(), Requests: r.requests.Load(), Retries: r.retries.Load(),
		BadGateways: r.badGateway.Load(), Moves: r.moves.Load(), MoveFailures: r.moveFailures.Load(),
		BytesIn: r.bytesIn.Load(), BytesOut: r.bytesOut.Load(), Upstream: r.cfg.Pool.Stats()}
}

// Serve runs a committed client connection until it ends, counted by the
// relay's Tracker. first is the upstream connection taken when the handoff
// was accepted (nil: take one when the first request is read).
func (r *Relay) Serve(client *net.TCPConn, first *Upstream) {
	r.Go(func() { r.serve(client, first) })
}

// ServeAccepted runs a client connection this BE accepted on VIP:port
// itself ([fe] accept = be) until it ends: its first request is routed
// too (Config.RouteFirst), and the connection moves to the BE it belongs
// to, or the request is served here. done, if not nil, runs when the
// session has ended.
func (r *Relay) ServeAccepted(client *net.TCPConn, done func()) {
	r.Go(func() {
		if done != nil {
			defer done()
		}
		s := r.newSession(client)
		s.accepted = true
		defer s.finish()
		s.loop()
	})
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
	for p := range r.pipes {
		// A TLS connection: no request boundary is visible, so it is busy
		// and its requests are not counted.
		c := Conn{Since: p.since, Busy: true, State: conntab.Established}
		if a, ok := p.client.RemoteAddr().(*net.TCPAddr); ok {
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
	var pipe *tlsPipe
	for p := range r.pipes {
		if a, ok := p.client.RemoteAddr().(*net.TCPAddr); ok && a.AddrPort() == client {
			pipe = p
			break
		}
	}
	r.mu.Unlock()
	if pipe != nil {
		// A TLS connection: the same RST, and its pipe ends on the error.
		pipe.client.SetLinger(0)
		pipe.client.Close()
		pipe.up.Close()
		return true
	}
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
