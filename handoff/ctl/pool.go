package ctl

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DialFunc opens a connection to a peer's control port.
type DialFunc func(ctx context.Context, peer netip.AddrPort) (net.Conn, error)

// Dialer returns a DialFunc that connects from the local address src (a
// host's real address: control traffic never leaves from the VIP). The port
// is chosen by connect(2), not bind(2) (IP_BIND_ADDRESS_NO_PORT): binding
// port 0 first makes the kernel search its bind buckets, which took 30 % of
// the machine with thousands of TIME_WAIT sockets (FACTS.md).
func Dialer(src netip.Addr) DialFunc {
	d := &net.Dialer{Timeout: 2 * time.Second, KeepAlive: -1}
	if src.IsValid() && !src.IsUnspecified() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	return func(ctx context.Context, peer netip.AddrPort) (net.Conn, error) {
		return d.DialContext(ctx, "tcp4", peer.String())
	}
}

// ErrNoSession is returned by Get when no session to a peer is up.
var ErrNoSession = errors.New("no control session")

// Pool keeps Per sessions open to each of its peers. Sessions are dialed,
// and redialed with backoff when they end, by one goroutine per slot; a
// handoff never waits for a dial (Get only picks among live sessions).
type Pool struct {
	cfg  *Config
	dial DialFunc
	per  int

	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	peers  map[netip.AddrPort]*peer
	wg     sync.WaitGroup
	// OnChange, if set, is called (without locks held) when a peer's first
	// session comes up or its last one goes down.
	OnChange func(peer netip.AddrPort, up bool, err error)
	// OnSession, if set, is called (without locks held, on the slot's
	// goroutine) with every new session, before OnChange: the place to
	// tell a peer, restarted or upgraded, what it needs to know.
	OnSession func(peer netip.AddrPort, s *Session)
}

type peer struct {
	addr     netip.AddrPort
	cancel   context.CancelFunc
	sessions []*Session
	lastErr  error
	wasUp    bool
}

// NewPool returns a pool of per sessions per peer.
func NewPool(cfg *Config, dial DialFunc, per int) *Pool {
	ctx, cancel := context.WithCancel(context.Background())
	return &Pool{cfg: cfg, dial: dial, per: max(per, 1), ctx: ctx, cancel: cancel, peers: map[netip.AddrPort]*peer{}}
}

// Add starts keeping sessions to addr. Adding a peer twice does nothing.
func (p *Pool) Add(addr netip.AddrPort) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.peers[addr]; ok || p.ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithCancel(p.ctx)
	pe := &peer{addr: addr, cancel: cancel}
	p.peers[addr] = pe
	for i := range p.per {
		p.wg.Go(func() { p.keep(ctx, pe, i) })
	}
}

// Remove closes the sessions to addr and stops redialing it.
func (p *Pool) Remove(addr netip.AddrPort) {
	p.mu.Lock()
	pe := p.peers[addr]
	delete(p.peers, addr)
	p.mu.Unlock()
	if pe != nil {
		pe.cancel()
	}
}

// Peers lists the pool's peers.
func (p *Pool) Peers() []netip.AddrPort {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]netip.AddrPort, 0, len(p.peers))
	for a := range p.peers {
		out = append(out, a)
	}
	return out
}

// Get returns the live session to addr with the fewest requests in flight,
// skipping except (a session that just failed a request). Sessions the peer
// is leaving are used only while their replacements are not up yet. It
// never dials.
func (p *Pool) Get(addr netip.AddrPort, except *Session) (*Session, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pe := p.peers[addr]
	if pe == nil {
		return nil, fmt.Errorf("%w to %v: not a known peer", ErrNoSession, addr)
	}
	var best, leaving *Session
	for _, s := range pe.sessions {
		if s == except {
			continue
		}
		select {
		case <-s.done:
			continue
		default:
		}
		if s.GoingAway() {
			if leaving == nil || s.Inflight() < leaving.Inflight() {
				leaving = s
			}
			continue
		}
		if best == nil || s.Inflight() < best.Inflight() {
			best = s
		}
	}
	if best == nil {
		best = leaving
	}
	if best == nil {
		if pe.lastErr != nil {
			return nil, fmt.Errorf("%w to %v: %v", ErrNoSession, addr, pe.lastErr)
		}
		return nil, fmt.Errorf("%w to %v", ErrNoSession, addr)
	}
	return best, nil
}

// Sessions returns the live sessions to addr.
func (p *Pool) Sessions(addr netip.AddrPort) []*Session {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pe := p.peers[addr]; pe != nil {
		return append([]*Session(nil), pe.sessions...)
	}
	return nil
}

// Close ends every session and stops redialing. It is idempotent.
func (p *Pool) Close() {
	p.cancel()
	p.wg.Wait()
}

const (
	backoffMin = 50 * time.Millisecond
	backoffMax = 5 * time.Second
)

// keep holds slot i of pe's sessions open until ctx ends.
func (p *Pool) keep(ctx context.Context, pe *peer, i int) {
	backoff := backoffMin
	// replaced is closed once the session that replaces one the peer is
	// leaving is up.
	var replaced chan struct{}
	defer func() {
		if replaced != nil {
			close(replaced)
		}
	}()
	for ctx.Err() == nil {
		s, err := p.connect(ctx, pe.addr)
		if err != nil {
			p.setErr(pe, err)
			if replaced != nil {
				// No replacement now (a BE that stops for good): the
				// session it leaves retires without waiting for one.
				close(replaced)
				replaced = nil
			}
			// Jitter keeps the slots of many FEs from redialing in step.
			d := backoff/2 + rand.N(backoff/2+1)
			backoff = min(2*backoff, backoffMax)
			select {
			case <-ctx.Done():
			case <-time.After(d):
			}
			continue
		}
		backoff = backoffMin
		p.attach(pe, s)
		if replaced != nil {
			close(replaced)
			replaced = nil
		}
		select {
		case <-ctx.Done():
			s.Close()
		case <-s.Done():
		case <-s.GoingAwayCh():
			// The peer is leaving this session (a BE handing over to its
			// successor): its replacement is dialed at once. The old one
			// takes new work until the replacement is up, so that a
			// handoff always finds a session, and then retires once the
			// work begun on it is done. The peer stays up all along.
			up := make(chan struct{})
			replaced = up
			p.wg.Go(func() {
				select {
				case <-up:
				case <-s.Done():
				case <-time.After(retireWait):
				}
				s.Retire(retireWait)
				s.Wait()
				p.detach(pe, s)
			})
			continue
		}
		s.Wait()
		p.detach(pe, s)
	}
}

// retireWait bounds how long a session the peer leaves waits for the work
// begun on it (an offer's commit comes within the handoff timeout).
const retireWait = 10 * time.Second

func (p *Pool) connect(ctx context.Context, addr netip.AddrPort) (*Session, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.handshakeTimeout())
	defer cancel()
	conn, err := p.dial(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	return Dial(conn, p.cfg)
}

func (p *Pool) setErr(pe *peer, err error) {
	p.mu.Lock()
	first := pe.lastErr == nil || pe.lastErr.Error() != err.Error()
	pe.lastErr = err
	p.mu.Unlock()
	if first {
		// Once per distinct error, not once per redial.
		p.cfg.Log.Warn("control session not established", "op", "control", "peer", pe.addr.String(), "err", err)
	}
}

func (p *Pool) attach(pe *peer, s *Session) {
	p.mu.Lock()
	pe.sessions = append(pe.sessions, s)
	up := !pe.wasUp
	pe.wasUp, pe.lastErr = true, nil
	p.mu.Unlock()
	if p.OnSession != nil {
		p.OnSession(pe.addr, s)
	}
	if up {
		p.cfg.Log.Info("control sessions up", "op", "control", "peer", pe.addr.String())
		if p.OnChange != nil {
			p.OnChange(pe.addr, true, nil)
		}
	}
}

func (p *Pool) detach(pe *peer, s *Session) {
	p.mu.Lock()
	for i, x := range pe.sessions {
		if x == s {
			pe.sessions = append(pe.sessions[:i], pe.sessions[i+1:]...)
			break
		}
	}
	down := len(pe.sessions) == 0 && pe.wasUp
	if down {
		pe.wasUp = false
	}
	p.mu.Unlock()
	if err := s.Err(); !errors.Is(err, ErrClosed) {
		p.cfg.Log.Debug("control session ended", "op", "control", "peer", pe.addr.String(), "err", err)
	}
	if down && p.OnChange != nil {
		p.OnChange(pe.addr, false, s.Err())
	}
}
