package ctl

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"tcpha/handoff/wire"
	"tcpha/internal/netaddr"
)

// Server accepts control sessions and bounds what a stranger can cost:
// connections from addresses that are not members are closed before a byte
// is read, the handshake has a deadline and reads only small frames, and
// the number of connections per source and in total is capped. An accept
// error such as EMFILE is waited out, never fatal.
//
// A member's address is not proof of anything: every local user of an FE's
// host connects from it. So the handshakes in progress from one source are
// slots that a new connection takes over rather than a door it finds shut:
// when a source's slots are full, its oldest handshake that has not even
// sent a Hello (else its oldest) is cut for the newcomer. A stranger who
// holds the slots with idle connections then cannot keep the genuine FE out
// (issue 19: 16 half-open connections locked a restarted BE out of its
// cluster), and a genuine handshake, done one round trip after its Hello,
// loses its slot only if the source opens MaxHandshaking more connections
// within that round trip.
type Server struct {
	Config *Config
	// Member tells whether a remote address may open sessions at all. It
	// is asked before anything is read from the connection.
	Member func(netip.Addr) bool
	// Admit may refuse a member by its Hello (its role, the address it
	// claims).
	Admit Admit
	// OnSession is called for each established session.
	OnSession func(*Session)
	// MaxPerSource caps connections from one address (handshaking or
	// established); MaxHandshaking is how many from one address may be in
	// the handshake before a new one evicts one of them; MaxTotal caps
	// all. Zero means the defaults below.
	MaxPerSource, MaxHandshaking, MaxTotal int

	conns    sync.WaitGroup
	mu       sync.Mutex
	stopped  bool
	bySource map[netip.Addr]*sourceCount
	total    int
	open     map[net.Conn]struct{} // from accept until served
	sessions map[*Session]struct{}
	refused  map[string]int64
}

type sourceCount struct {
	open int
	// handshaking are the connections still in their handshake, oldest
	// first.
	handshaking []*pending
}

// pending is a connection in its handshake.
type pending struct {
	conn net.Conn
	// hello is set once the peer's Hello was read and admitted.
	hello atomic.Bool
}

// Defaults for the caps: an FE keeps connperbe (at most 1024) sessions to a
// BE; the rest is headroom for redials.
const (
	DefaultMaxPerSource   = 1100
	DefaultMaxHandshaking = 16
	DefaultMaxTotal       = 8192
)

// Refusal reasons, as counted by Refused.
const (
	RefusedNotMember = "not-member"
	RefusedPerSource = "per-source-limit"
	RefusedTotal     = "total-limit"
	RefusedHandshake = "handshake"
	// RefusedEvicted counts handshakes cut for a newer connection from
	// the same source.
	RefusedEvicted = "handshake-evicted"
)

// Serve accepts on ln until ctx ends, then closes ln and every session and
// returns once their goroutines have exited.
func (sv *Server) Serve(ctx context.Context, ln net.Listener) error {
	defer sv.conns.Wait()
	sv.mu.Lock()
	if sv.bySource == nil {
		sv.bySource = map[netip.Addr]*sourceCount{}
		sv.open = map[net.Conn]struct{}{}
		sv.sessions = map[*Session]struct{}{}
		sv.refused = map[string]int64{}
	}
	sv.mu.Unlock()
	// Closing every connection ends its session, or its handshake.
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		sv.mu.Lock()
		sv.stopped = true
		for c := range sv.open {
			c.Close()
		}
		sv.mu.Unlock()
	})
	defer stop()
	log := sv.Config.Log
	backoff := time.Duration(0)
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// EMFILE, ENFILE, ENOBUFS, ECONNABORTED...: the listener is
			// fine, the moment is not. Wait and go on serving.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			if backoff == 5*time.Millisecond || backoff == time.Second {
				log.Warn("accept control connection", "op", "control", "err", err, "retry_in", backoff)
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		src := netaddr.AddrPort(conn.RemoteAddr()).Addr()
		if sv.Member != nil && !sv.Member(src) {
			sv.refuse(RefusedNotMember)
			conn.Close()
			continue
		}
		p := &pending{conn: conn}
		if reason := sv.take(src, p); reason != "" {
			sv.refuse(reason)
			conn.Close()
			continue
		}
		sv.conns.Go(func() { sv.serveConn(p, src) })
	}
}

func (sv *Server) limits() (perSource, handshaking, total int) {
	perSource, handshaking, total = sv.MaxPerSource, sv.MaxHandshaking, sv.MaxTotal
	if perSource <= 0 {
		perSource = DefaultMaxPerSource
	}
	if handshaking <= 0 {
		handshaking = DefaultMaxHandshaking
	}
	if total <= 0 {
		total = DefaultMaxTotal
	}
	return
}

// take counts a new connection from src in, evicting one of the source's
// handshakes if they fill its slots, or says which cap refuses it.
func (sv *Server) take(src netip.Addr, p *pending) string {
	perSource, handshaking, total := sv.limits()
	sv.mu.Lock()
	defer sv.mu.Unlock()
	if sv.stopped {
		return RefusedTotal
	}
	c := sv.bySource[src]
	if c == nil {
		c = &sourceCount{}
		sv.bySource[src] = c
	}
	switch {
	case sv.total >= total:
		return RefusedTotal
	case c.open >= perSource:
		return RefusedPerSource
	}
	if len(c.handshaking) >= handshaking {
		// The evicted connection's goroutine sees its read fail and
		// releases it; it no longer holds a slot from now on.
		v := evict(c.handshaking)
		c.handshaking = slices.Delete(c.handshaking, v, v+1)
		sv.refused[RefusedEvicted]++
	}
	c.open++
	c.handshaking = append(c.handshaking, p)
	sv.total++
	sv.open[p.conn] = struct{}{}
	return ""
}

// evict closes the handshake a newcomer takes the slot of, and returns its
// index in hs: the oldest that has sent no Hello yet (a genuine peer sends
// its Hello as soon as it connects), else the oldest. hs is not empty.
func evict(hs []*pending) int {
	for i, p := range hs {
		if !p.hello.Load() {
			p.conn.Close()
			return i
		}
	}
	hs[0].conn.Close()
	return 0
}

// handshook takes p out of its source's handshake slots, if it is still
// there.
func (c *sourceCount) handshook(p *pending) {
	if i := slices.Index(c.handshaking, p); i >= 0 {
		c.handshaking = slices.Delete(c.handshaking, i, i+1)
	}
}

func (sv *Server) release(src netip.Addr, p *pending) {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	delete(sv.open, p.conn)
	c := sv.bySource[src]
	c.open--
	c.handshook(p)
	if c.open == 0 {
		delete(sv.bySource, src)
	}
	sv.total--
}

func (sv *Server) refuse(reason string) {
	sv.mu.Lock()
	sv.refused[reason]++
	sv.mu.Unlock()
}

func (sv *Server) serveConn(p *pending, src netip.Addr) {
	conn := p.conn
	admit := func(remote net.Addr, h wire.Hello) error {
		if sv.Admit != nil {
			if err := sv.Admit(remote, h); err != nil {
				return err
			}
		}
		p.hello.Store(true)
		return nil
	}
	s, err := Accept(conn, sv.Config, admit)
	if err != nil {
		sv.Config.Log.Warn("control session refused", "op", "control", "peer", conn.RemoteAddr().String(), "err", err)
		sv.release(src, p)
		sv.refuse(RefusedHandshake)
		return
	}
	sv.mu.Lock()
	sv.bySource[src].handshook(p)
	sv.sessions[s] = struct{}{}
	sv.mu.Unlock()
	if sv.OnSession != nil {
		sv.OnSession(s)
	}
	s.Wait()
	sv.mu.Lock()
	delete(sv.sessions, s)
	sv.mu.Unlock()
	sv.release(src, p)
}

// Drain retires every session: each is sent a goaway, and the peer moves
// its work to new sessions (to a successor that shares the listener) and
// answers once the work begun on the old one is done (Session.GoAway).
// Drain returns when no session is left, closing those still open after d.
// The caller has closed the listener, or handed it on.
func (sv *Server) Drain(d time.Duration) {
	deadline := time.Now().Add(d)
	told := map[*Session]bool{}
	for {
		left := sv.Sessions()
		if len(left) == 0 {
			return
		}
		late := time.Now().After(deadline)
		for _, s := range left {
			switch {
			case late:
				s.Close()
			case !told[s]:
				// Sessions still in their handshake when Drain began are
				// told once they are up.
				told[s] = true
				s.GoAway()
			}
		}
		if late {
			sv.Config.Log.Warn("control sessions closed before their peers were done", "op", "control", "sessions", len(left))
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Sessions returns the established sessions.
func (sv *Server) Sessions() []*Session {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	out := make([]*Session, 0, len(sv.sessions))
	for s := range sv.sessions {
		out = append(out, s)
	}
	return out
}

// Refused returns how many connections were refused, by reason.
func (sv *Server) Refused() map[string]int64 {
	sv.mu.Lock()
	defer sv.mu.Unlock()
	out := make(map[string]int64, len(sv.refused))
	for k, v := range sv.refused {
		out[k] = v
	}
	return out
}
