package backends

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
)

// DialFunc opens a control connection to a BE's handoff listener.
type DialFunc func(ctx context.Context, be netip.AddrPort) (net.Conn, error)

// Pool keeps up to perBE idle persistent control connections to each BE
// (the seed's connperbe). When none is idle a new one is dialed, as in the
// seed ("If no idle connections, create a connection with BE"); on return
// it is kept only if there is room.
type Pool struct {
	dial   DialFunc
	perBE  int
	mu     sync.Mutex
	idle   map[netip.AddrPort][]net.Conn
	closed bool
}

// ErrPoolClosed is returned by Get after Close.
var ErrPoolClosed = errors.New("control connection pool closed")

// NewPool returns a pool that dials with dial.
func NewPool(dial DialFunc, perBE int) *Pool {
	return &Pool{dial: dial, perBE: perBE, idle: map[netip.AddrPort][]net.Conn{}}
}

// Conn is a control connection borrowed from the pool.
type Conn struct {
	net.Conn
	BE netip.AddrPort
	// Reused tells whether the connection had served before; a failure on
	// a reused connection may only mean the BE closed it while idle.
	Reused bool
}

// Get borrows an idle connection to be, or dials a new one.
func (p *Pool) Get(ctx context.Context, be netip.AddrPort) (*Conn, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrPoolClosed
	}
	if l := p.idle[be]; len(l) > 0 {
		c := l[len(l)-1]
		p.idle[be] = l[:len(l)-1]
		p.mu.Unlock()
		return &Conn{Conn: c, BE: be, Reused: true}, nil
	}
	p.mu.Unlock()
	c, err := p.dial(ctx, be)
	if err != nil {
		return nil, err
	}
	return &Conn{Conn: c, BE: be}, nil
}

// Put returns a healthy connection for reuse.
func (p *Pool) Put(c *Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || len(p.idle[c.BE]) >= p.perBE {
		c.Conn.Close()
		return
	}
	p.idle[c.BE] = append(p.idle[c.BE], c.Conn)
}

// Discard closes a connection that failed.
func (p *Pool) Discard(c *Conn) { c.Conn.Close() }

// Drop closes every idle connection to be, after it was found down.
func (p *Pool) Drop(be netip.AddrPort) {
	p.mu.Lock()
	l := p.idle[be]
	delete(p.idle, be)
	p.mu.Unlock()
	for _, c := range l {
		c.Close()
	}
}

// Idle reports how many idle connections to be the pool holds.
func (p *Pool) Idle(be netip.AddrPort) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle[be])
}

// Close closes every idle connection; later Gets fail. It is idempotent.
func (p *Pool) Close() {
	p.mu.Lock()
	idle := p.idle
	p.idle, p.closed = map[netip.AddrPort][]net.Conn{}, true
	p.mu.Unlock()
	for _, l := range idle {
		for _, c := range l {
			c.Close()
		}
	}
}
