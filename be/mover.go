package be

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"time"

	"tcpha/handoff"
	"tcpha/handoff/ctl"
	"tcpha/handoff/repair"
	"tcpha/handoff/wire"
	"tcpha/relay"
)

// moveAnswer bounds how long a BE waits for the FE's answer to a
// migration: longer than the FE takes to settle one (fe's moveWithin,
// 4 s), so that only an FE that is gone leaves the outcome unknown.
const moveAnswer = 6 * time.Second

// mover moves the BE's connections (relay.Mover): straight to the other
// BE when a session to it is up (handoff.Direct), else through the FE
// (handoff.Leaver).
type mover struct {
	b      *BE
	leaver *handoff.Leaver
	direct *handoff.Direct
	peers  *ctl.Pool // the BE-to-BE sessions
}

func newMover(b *BE, leaving *handoff.Leaving) mover {
	return mover{b: b, peers: b.peers, leaver: &handoff.Leaver{Ask: b.askFEs, Timeout: moveAnswer, Log: b.log, Leaving: leaving},
		direct: &handoff.Direct{Peer: &handoff.Client{Pool: b.peers}, Switch: b.switchAt,
			Timeout: b.cfg.CommitTimeout, SwitchTimeout: moveAnswer, Log: b.log, Leaving: leaving}}
}

// Moving tells whether the FE's cluster frame says phttp = multi.
func (m mover) Moving() bool {
	c := m.b.cluster.Load()
	return c != nil && c.phttp == wire.PHTTPMulti
}

func (m mover) Acked(ctx context.Context, c *net.TCPConn) error { return repair.WaitAcked(ctx, c) }

func (m mover) Move(c *net.TCPConn, pending []byte, to []netip.Addr) (relay.Outcome, error) {
	sock := repair.LeavingSocket{Socket: repair.Socket{Conn: c}}
	var err error
	targets, ok := m.directTo(pending)
	if len(to) > 0 {
		// This BE's scheduler placed the first request (routeFirst): to
		// those BEs, straight when a session to one is up, else through
		// the FE, which routes it by its own view.
		targets, ok = m.b.controlAddrs(to), false
		for _, t := range targets {
			ok = ok || len(m.peers.Sessions(t)) > 0
		}
	}
	if ok {
		if len(targets) == 0 {
			return relay.Local, nil // the rules give the request to this BE
		}
		_, err = m.direct.Leave(context.Background(), sock, pending, targets)
	} else {
		err = m.leaver.Leave(context.Background(), sock, pending)
	}
	switch {
	case err == nil:
		return relay.Gone, nil
	case errors.Is(err, handoff.ErrStay):
		return relay.Local, nil
	case errors.Is(err, handoff.ErrNoBE):
		return relay.Kept, err
	case errors.Is(err, handoff.ErrCut):
		// Maybe another BE serves it now: a RST rather than two BEs
		// answering one connection.
		c.SetLinger(0)
		c.Close()
		return relay.Gone, err
	}
	return relay.Kept, err
}

// directTo says whether the connection whose next request is at the front
// of pending moves straight to another BE, and to which, in the FE's
// order: only when this BE has a BE-to-BE session to one of them. None,
// with ok, means the request is this BE's.
func (m mover) directTo(pending []byte) (targets []netip.AddrPort, ok bool) {
	targets, stay, err := m.b.directTargets(pending)
	switch {
	case err != nil:
		return nil, false
	case stay:
		return nil, true
	}
	for _, t := range targets {
		if len(m.peers.Sessions(t)) > 0 {
			return targets, true
		}
	}
	return nil, false
}

// askFEs sends a migrate request to the FEs with sessions to this BE, on
// the least busy session of each that is not going away, to all at once
// (handoff.AskFEs, handoff.Leaver.Ask).
func (b *BE) askFEs(ctx context.Context, f wire.Frame) (wire.Ack, error) {
	return handoff.AskFEs(ctx, b.fesToAsk(), f)
}

// fesToAsk are the FEs to ask, each through its least busy session.
func (b *BE) fesToAsk() []handoff.FE {
	var order []netip.Addr
	byFE := map[netip.Addr]*ctl.Session{}
	for _, s := range b.server.Sessions() {
		if s.Peer.Role != wire.RoleFE {
			continue // another BE's, for direct moves
		}
		if s.GoingAway() || s.SentGoAway() {
			continue // its FE is handing over to a successor, or this BE to its own
		}
		a := s.Remote.Addr()
		if cur := byFE[a]; cur == nil {
			order = append(order, a)
			byFE[a] = s
		} else if s.Inflight() < cur.Inflight() {
			byFE[a] = s
		}
	}
	fes := make([]handoff.FE, len(order))
	for i, a := range order {
		fes[i] = handoff.FE{Addr: a, Call: byFE[a].Call}
	}
	return fes
}
