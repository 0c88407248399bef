package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
	"tcpha/internal/gopool"
)

// Rebuilder rebuilds handed-off sockets on the BE (repair.Rebuild in
// production). The socket stays silent until activated.
type Rebuilder interface {
	Rebuild(ci *wire.ConnInfo) (Rebuilt, error)
}

// Rebuilt is a rebuilt socket still in repair mode.
type Rebuilt interface {
	// Activate leaves repair mode: the connection is live here.
	Activate() (*net.TCPConn, error)
	// Discard closes it without a packet to the client.
	Discard()
}

// Upstream is one connection to the BE's own web server.
type Upstream interface {
	Close() error
}

// Deliverer is an Upstream that takes the rebuilt connection itself
// (`deliver = socket`): Deliver rebuilds ci onto the web server's own
// socket, or falls back to rb (the relay) for this connection. What it
// returns behaves as rb's Rebuilt does: silent until Activate, which may
// return a nil connection when the server owns it (Run is then told so by
// its Upstream).
type Deliverer interface {
	Upstream
	Deliver(ci *wire.ConnInfo, rb Rebuilder) (Rebuilt, error)
}

// Receiver is the BE's side of the handoff (the seed's SHR). It serves the
// offers of any number of control sessions concurrently: the session's
// reader never waits for a handoff. An offer is validated, the web server
// connected, the socket rebuilt in repair mode, and the ACK sent; only the
// FE's commit activates the socket, so a handoff that is not committed
// leaves no trace on the wire.
type Receiver struct {
	// VIP is this BE's VIP; Check validates the rest of an offer (the
	// client address, the VIP's port), and says why it refuses.
	VIP   netip.Addr
	Check func(ci *wire.ConnInfo, from *ctl.Session) (wire.Result, error)
	// Rebuilder rebuilds sockets; Connect opens the way to the web server
	// for the offered connection ci (failing fast when it is down, so the
	// FE tries elsewhere); Run runs a committed connection until it ends.
	Rebuilder Rebuilder
	Connect   func(ctx context.Context, ci *wire.ConnInfo) (Upstream, error)
	Run       func(client *net.TCPConn, up Upstream)
	// Reset, if set, resets the served connection of client (RST to the
	// client) when its FE leaves it, and tells whether there was one.
	Reset func(client netip.AddrPort) bool
	// Held, if set, lists the client flows this BE holds on the VIP and
	// port, sorted ascending: the answer to an FE's held question.
	Held func(port uint16) ([]netip.AddrPort, error)
	// CommitTimeout is how long a rebuilt socket waits for its commit.
	CommitTimeout time.Duration
	// MaxPending bounds the handoffs in progress (offered, not yet
	// committed): the seed's maxclients, which bounds work, not the idle
	// connections a BE holds.
	MaxPending int
	Log        *slog.Logger
	// Observe, if set, is told the result of every offer answered.
	Observe func(wire.Result)
	// Leaving, if set, holds the connections this BE is moving away
	// (multi-handoff): one coming back is rebuilt once its old socket is
	// gone.
	Leaving *Leaving

	draining atomic.Bool
	served   atomic.Int64
	refused  atomic.Int64

	offers  sync.WaitGroup
	workers *gopool.Pool
	once    sync.Once
	mu      sync.Mutex
	pending map[netip.AddrPort]*pendingHandoff
}

type pendingHandoff struct {
	from netip.Addr     // the FE (or BE) that offered it
	next chan wire.Type // its commit or abort
	gone chan struct{}  // closed once its socket is activated or discarded
}

// Stats are the receiver's counters.
type Stats struct {
	Pending         int
	Served, Refused int64
}

// Stats returns the receiver's counters.
func (r *Receiver) Stats() Stats {
	r.mu.Lock()
	n := len(r.pending)
	r.mu.Unlock()
	return Stats{Pending: n, Served: r.served.Load(), Refused: r.refused.Load()}
}

// Drain refuses new offers from now on; handoffs under way finish.
func (r *Receiver) Drain() { r.draining.Store(true) }

// Wait returns once no offer is in progress: every one was refused, timed
// out, aborted, or committed and given to Run (which may still run it).
func (r *Receiver) Wait() { r.offers.Wait() }

// Serve implements ctl.Handler for the BE's sessions.
func (r *Receiver) Serve(s *ctl.Session, f wire.Frame) {
	switch f.Type {
	case wire.TypeOffer:
		r.once.Do(func() { r.workers = gopool.New(64) })
		r.offers.Add(1)
		r.workers.Go(func() {
			settled := sync.OnceFunc(r.offers.Done)
			defer settled()
			r.offer(s, f, settled)
		})
	case wire.TypeReset:
		var fl wire.Flow
		if err := fl.UnmarshalBinary(f.Payload); err != nil {
			r.Log.Warn("control frame dropped", "op", "reset", "peer", s.Remote.String(), "err", err)
			return
		}
		if r.Reset == nil || !r.Reset(fl.Client) {
			s.Reply(f, ctl.AckFrame(wire.ResultUnknown, "no such connection"))
			return
		}
		r.Log.Info("connection reset: its FE stopped forwarding it", "op", "reset", "peer", s.Remote.String(),
			"client", fl.Client.String())
		s.Reply(f, ctl.AckFrame(wire.ResultOK, ""))
	case wire.TypeHeld:
		// A kernel dump: off the session's reader.
		go r.held(s, f)
	case wire.TypeCommit, wire.TypeAbort:
		var fl wire.Flow
		if err := fl.UnmarshalBinary(f.Payload); err != nil {
			r.Log.Warn("control frame dropped", "op", "commit", "peer", s.Remote.String(), "err", err)
			return
		}
		r.mu.Lock()
		p := r.pending[fl.Client]
		if p != nil && p.from == s.Remote.Addr() {
			delete(r.pending, fl.Client)
		} else {
			p = nil
		}
		r.mu.Unlock()
		if p == nil {
			// Its handoff timed out here already, or it was replaced.
			r.Log.Info("commit or abort for no pending handoff", "op", "commit", "type", f.Type.String(),
				"client", fl.Client.String(), "peer", s.Remote.String())
			return
		}
		p.next <- f.Type
	default:
		r.Log.Warn("unexpected control frame", "op", "control", "type", f.Type.String(), "peer", s.Remote.String())
		s.Reply(f, ctl.AckFrame(wire.ResultInvalid, "unexpected "+f.Type.String()))
	}
}

// offer serves one handoff request, answering it with an ACK, and runs the
// connection once committed (calling settled first).
func (r *Receiver) offer(s *ctl.Session, f wire.Frame, settled func()) {
	log := r.Log.With("peer", s.Remote.String())
	refuse := func(res wire.Result, why error) {
		r.refused.Add(1)
		r.observe(res)
		log.Info("handoff refused", "op", "handoff", "result", res.String(), "err", why)
		s.Reply(f, ctl.AckFrame(res, why.Error()))
	}
	var ci wire.ConnInfo
	if err := ci.UnmarshalBinary(f.Payload); err != nil {
		refuse(wire.ResultBadFrame, err)
		return
	}
	log = log.With("client", ci.Client.String())
	if ci.ConnMagic() != f.ConnMagic {
		refuse(wire.ResultBadFrame, fmt.Errorf("conn_magic %d does not match the connection's %d", f.ConnMagic, ci.ConnMagic()))
		return
	}
	if ci.VIP.Addr() != r.VIP {
		refuse(wire.ResultWrongVIP, fmt.Errorf("connection is for %v, this BE serves VIP %v", ci.VIP.Addr(), r.VIP))
		return
	}
	if r.Check != nil {
		if res, err := r.Check(&ci, s); err != nil {
			if res == wire.ResultOK {
				res = wire.ResultInvalid // an error is never an OK
			}
			refuse(res, err)
			return
		}
	}
	if r.draining.Load() {
		refuse(wire.ResultDraining, errors.New("this BE is stopping"))
		return
	}
	p := &pendingHandoff{from: s.Remote.Addr(), next: make(chan wire.Type, 1), gone: make(chan struct{})}
	defer close(p.gone)
	replaced, err := r.hold(ci.Client, p)
	if err != nil {
		refuse(wire.ResultBusy, err)
		return
	}
	held := true
	release := func() {
		if held {
			r.mu.Lock()
			if r.pending[ci.Client] == p {
				delete(r.pending, ci.Client)
			}
			r.mu.Unlock()
			held = false
		}
	}
	defer release()

	// Connect first: a BE whose web server is down says so, and the FE
	// tries elsewhere before anything was rebuilt.
	cctx, cancel := context.WithTimeout(context.Background(), time.Second)
	up, err := r.Connect(cctx, &ci)
	cancel()
	if err != nil {
		refuse(wire.ResultUpstream, err)
		return
	}
	if replaced != nil {
		// The earlier attempt's socket holds the 4-tuple until it is gone.
		select {
		case <-replaced.gone:
		case <-time.After(time.Second):
			up.Close()
			refuse(wire.ResultBusy, fmt.Errorf("an earlier handoff of %v is still being dropped", ci.Client))
			return
		}
	}
	if !r.Leaving.Wait(ci.Client, time.Second) {
		up.Close()
		refuse(wire.ResultBusy, fmt.Errorf("%v is still moving away from this BE", ci.Client))
		return
	}
	start := time.Now()
	var rb Rebuilt
	if d, ok := up.(Deliverer); ok {
		rb, err = d.Deliver(&ci, r.Rebuilder)
	} else {
		rb, err = r.Rebuilder.Rebuild(&ci)
	}
	if err != nil {
		up.Close()
		refuse(wire.ResultRestore, err)
		return
	}
	r.observe(wire.ResultOK)
	if err := s.Reply(f, ctl.AckFrame(wire.ResultOK, "")); err != nil {
		rb.Discard()
		up.Close()
		return
	}
	// Serve only once the FE forwards the client's packets here (FACTS.md:
	// serving earlier lost ACKs and FINs). Until then the socket is silent.
	timer := time.NewTimer(r.CommitTimeout)
	defer timer.Stop()
	// A BE that moves a connection here directly commits it itself; if it
	// dies first, the FE may already forward the client here, and the
	// client would wait for CommitTimeout and its next retransmission.
	// Its own socket died with it: the connection is reset from here.
	var gone <-chan struct{}
	if s.Peer.Role == wire.RoleBE {
		gone = s.Done()
	}
	var t wire.Type
	select {
	case t = <-p.next:
	case <-gone:
		select {
		case t = <-p.next: // the commit came before the session ended
		default:
			release()
			log.Warn("the BE moving the connection went away before its commit: reset", "op", "commit")
			if conn, err := rb.Activate(); err == nil {
				conn.SetLinger(0)
				conn.Close()
			} else {
				rb.Discard()
			}
			up.Close()
			return
		}
	case <-timer.C:
		release()
		log.Warn("no commit from the FE; rebuilt socket dropped silently", "op", "commit", "timeout", r.CommitTimeout)
		rb.Discard()
		up.Close()
		return
	}
	held = false // Serve removed it
	if t == wire.TypeAbort {
		log.Info("handoff aborted by the FE", "op", "commit")
		rb.Discard()
		up.Close()
		return
	}
	conn, err := rb.Activate()
	if err != nil {
		log.Error("activate rebuilt socket", "op", "commit", "err", err)
		up.Close()
		return
	}
	r.served.Add(1)
	log.Debug("connection handed off", "op", "handoff", "rebuild", time.Since(start))
	settled()
	r.Run(conn, up)
}

func (r *Receiver) observe(res wire.Result) {
	if r.Observe != nil {
		r.Observe(res)
	}
}

// hold registers a pending handoff for client, unless MaxPending handoffs
// are in progress. One the same peer offered before (its session failed
// before the ACK and the FE tries again) is aborted and returned: the new
// one may rebuild only once it is gone.
func (r *Receiver) hold(client netip.AddrPort, p *pendingHandoff) (replaced *pendingHandoff, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending == nil {
		r.pending = map[netip.AddrPort]*pendingHandoff{}
	}
	if old := r.pending[client]; old != nil {
		if old.from != p.from {
			return nil, fmt.Errorf("a handoff of %v from %v is in progress", client, old.from)
		}
		select {
		case old.next <- wire.TypeAbort:
		default: // it has its commit or abort already
		}
		replaced = old
	} else if len(r.pending) >= r.MaxPending {
		return nil, fmt.Errorf("%d handoffs in progress (maxclients)", r.MaxPending)
	}
	r.pending[client] = p
	return replaced, nil
}

// mergeHeld is the sorted union of two sorted flow lists, in a new slice.
func mergeHeld(a, b []netip.AddrPort) []netip.AddrPort {
	out := append(append(make([]netip.AddrPort, 0, len(a)+len(b)), a...), b...)
	slices.SortFunc(out, netip.AddrPort.Compare)
	return slices.Compact(out)
}

// held answers an FE's held question with one page of the flows this BE
// holds on the FE's VIP port and, if it has one, its TLS port: a TLS flow
// left out would look ended to the FE, which would stop forwarding it.
func (r *Receiver) held(s *ctl.Session, f wire.Frame) {
	var ask wire.HeldAsk
	if err := ask.UnmarshalBinary(f.Payload); err != nil {
		r.Log.Warn("control frame dropped", "op", "held", "peer", s.Remote.String(), "err", err)
		s.Reply(f, ctl.AckFrame(wire.ResultBadFrame, err.Error()))
		return
	}
	if r.Held == nil {
		s.Reply(f, ctl.AckFrame(wire.ResultInvalid, "unexpected held"))
		return
	}
	flows, err := r.Held(s.Peer.VIP.Port())
	if err == nil && s.Peer.TLSPort != 0 {
		var tls []netip.AddrPort
		if tls, err = r.Held(s.Peer.TLSPort); err == nil {
			flows = mergeHeld(flows, tls)
		}
	}
	if err != nil {
		r.Log.Warn("held connections not listed", "op", "held", "peer", s.Remote.String(), "err", err)
		s.Reply(f, ctl.AckFrame(wire.ResultInvalid, err.Error()))
		return
	}
	p, err := HeldPage(flows, ask).MarshalBinary()
	if err != nil {
		s.Reply(f, ctl.AckFrame(wire.ResultInvalid, err.Error()))
		return
	}
	s.Reply(f, wire.Frame{Type: wire.TypeHeldList, Payload: p})
}
