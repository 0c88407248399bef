package relay

import (
	"bufio"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Upstream is one connection to the BE's own web server.
type Upstream struct {
	Conn *net.TCPConn
	br   *bufio.Reader
	pool *Pool
	// idleSince is when it went back to the pool.
	idleSince time.Time
	// idled says it sat idle before its next request: back in the pool
	// after one, or taken when a handoff was accepted and held through the
	// commit. The web server may have closed it meanwhile (nginx stopping,
	// restarting or timing it out), so a request that fails on it before
	// any answer goes once more on a new connection.
	idled bool
}

// Close discards the connection; Pool.Put returns a healthy one instead.
func (u *Upstream) Close() error {
	if u.pool != nil {
		u.pool.dropped.Add(1)
	}
	return u.Conn.Close()
}

// Pool keeps idle keep-alive connections to the local web server, so that
// a client's request does not wait for, nor the machine pay for, a new
// loopback connection: a BE relaying thousands of short client connections
// per second uses a few upstream connections over and over.
type Pool struct {
	// Dial opens a new connection to the web server.
	Dial func(ctx context.Context) (*net.TCPConn, error)
	// Name is the web server's BE in the access log, for a pool of
	// another BE's web server (phttp = forward).
	Name string
	// MaxIdle bounds the idle connections kept; IdleTimeout drops one idle
	// longer than that, well before the server's own keep-alive timeout
	// (nginx: 75 s), so a request rarely meets a connection the server is
	// closing.
	MaxIdle     int
	IdleTimeout time.Duration

	mu     sync.Mutex
	idle   []*Upstream // most recently used last
	closed bool

	dialed, reuses, dropped atomic.Int64
}

// Defaults of a Pool.
const (
	DefaultMaxIdle     = 512
	DefaultIdleTimeout = 30 * time.Second
)

// ErrPoolClosed is returned by Get after Close.
var ErrPoolClosed = errors.New("upstream pool closed")

// Get returns an idle connection, or dials a new one.
func (p *Pool) Get(ctx context.Context) (*Upstream, error) {
	now := time.Now()
	timeout := p.IdleTimeout
	if timeout <= 0 {
		timeout = DefaultIdleTimeout
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrPoolClosed
	}
	var stale []*Upstream
	var u *Upstream
	for len(p.idle) > 0 {
		x := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		if now.Sub(x.idleSince) >= timeout || closing(x.Conn) {
			stale = append(stale, x)
			continue
		}
		u = x
		break
	}
	p.mu.Unlock()
	for _, x := range stale {
		x.Close()
	}
	if u != nil {
		p.reuses.Add(1)
		return u, nil
	}
	return p.dial(ctx)
}

// closing tells whether the web server closed an idle connection (or sent
// something unasked on it): a peek that does not wait. A server that
// stopped closed its idle connections, so finding them closed here makes
// Get dial, and a server that is down fails fast.
func closing(c *net.TCPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return true
	}
	var one [1]byte
	gone := false
	if err := rc.Control(func(fd uintptr) {
		_, _, e := unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		gone = !errors.Is(e, unix.EAGAIN)
	}); err != nil {
		return true
	}
	return gone
}

func (p *Pool) dial(ctx context.Context) (*Upstream, error) {
	c, err := p.Dial(ctx)
	if err != nil {
		return nil, err
	}
	p.dialed.Add(1)
	return &Upstream{Conn: c, br: bufio.NewReaderSize(c, 16<<10), pool: p}, nil
}

// Fresh dials a new connection, skipping the idle ones (a retry after a
// connection that sat idle turned out to be closing).
func (p *Pool) Fresh(ctx context.Context) (*Upstream, error) { return p.dial(ctx) }

// Put returns a connection that finished a response cleanly and may serve
// another.
func (p *Pool) Put(u *Upstream) {
	max := p.MaxIdle
	if max <= 0 {
		max = DefaultMaxIdle
	}
	u.idleSince, u.idled = time.Now(), true
	p.mu.Lock()
	if p.closed || len(p.idle) >= max || u.br.Buffered() > 0 {
		p.mu.Unlock()
		u.Close()
		return
	}
	p.idle = append(p.idle, u)
	p.mu.Unlock()
}

// Close closes the idle connections; Get fails afterwards. It is
// idempotent.
func (p *Pool) Close() {
	p.mu.Lock()
	idle := p.idle
	p.idle, p.closed = nil, true
	p.mu.Unlock()
	for _, u := range idle {
		u.Close()
	}
}

// PoolStats are a pool's counters.
type PoolStats struct {
	Idle                    int
	Dialed, Reuses, Dropped int64
}

// Stats returns the pool's counters.
func (p *Pool) Stats() PoolStats {
	p.mu.Lock()
	n := len(p.idle)
	p.mu.Unlock()
	return PoolStats{Idle: n, Dialed: p.dialed.Load(), Reuses: p.reuses.Load(), Dropped: p.dropped.Load()}
}
