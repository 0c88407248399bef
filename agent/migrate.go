package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"tcpha/backends"
	"time"

	"tcpha/handoff"
	"tcpha/handoff/conntab"
	"tcpha/handoff/ctl"
	"tcpha/handoff/repair"
	"tcpha/handoff/wire"
	"tcpha/phttp"
	"tcpha/relay"
)

// Multi-handoff (phttp = multi, TCPHA 0.3): a BE whose connection's next
// request belongs to another BE gives the connection back to the FE that
// forwards it (handoff.Leaver), and the FE hands it on like a new one
// (handoff.Sender.Move), switching its forwarding in one replace.

// Bounds of a migration: the FE settles it within moveWithin (its offers
// included) and answers; the BE waits for that answer up to moveAnswer, so
// that only an FE that is gone leaves the outcome unknown.
const (
	moveWithin = 4 * time.Second
	moveAnswer = 6 * time.Second
)

// maxMoves bounds the migrations an FE carries out at once.
const maxMoves = 256

// serveBE serves the requests a BE starts on the FE's control sessions:
// migrations. Each runs in its own goroutine, at most maxMoves at once.
func (f *fe) serveBE(s *ctl.Session, fr wire.Frame) {
	if fr.Type != wire.TypeMigrate {
		f.log.Warn("unexpected control frame", "op", "control", "type", fr.Type.String(), "peer", s.Remote.String())
		s.Reply(fr, ctl.AckFrame(wire.ResultInvalid, "unexpected "+fr.Type.String()))
		return
	}
	select {
	case f.moves <- struct{}{}:
	default:
		f.m.Migrations.WithLabelValues(wire.ResultBusy.String()).Inc()
		f.notMoved.Add(1)
		s.Reply(fr, ctl.AckFrame(wire.ResultBusy, "too many migrations in progress"))
		return
	}
	go func() {
		defer func() { <-f.moves }()
		res, why := f.migrate(s.Remote.Addr(), fr)
		f.m.Migrations.WithLabelValues(res.String()).Inc()
		if res == wire.ResultOK {
			f.moved.Add(1)
		} else {
			f.notMoved.Add(1)
		}
		s.Reply(fr, ctl.AckFrame(res, why))
	}()
}

// stopMoves refuses migrations from now on (busy: the BE serves the request
// itself, and its next one may move through the successor) and waits until
// those under way have ended or ctx does: the connection table is about to
// go to a successor.
func (f *fe) stopMoves(ctx context.Context) {
	f.mover.Store(nil)
	for len(f.moves) > 0 {
		select {
		case <-ctx.Done():
			f.log.Warn("migrations still under way at the handover", "op", "upgrade", "migrations", len(f.moves))
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// migrate moves the connection a BE (from) gave back to the BE its next
// request belongs to, and says how it went.
func (f *fe) migrate(from netip.Addr, fr wire.Frame) (wire.Result, string) {
	sender := f.mover.Load()
	if sender == nil {
		return wire.ResultBusy, "the FE is starting or handing over"
	}
	if wire.PHTTP(f.phttp.Load()) != wire.PHTTPMulti {
		return wire.ResultInvalid, "phttp is not multi on this FE"
	}
	ci, q, res, why := parseMigration(fr, netip.AddrPortFrom(f.cfg.VAddr, f.cfg.Port), f.cfg.MaxHeader)
	if res != wire.ResultOK {
		return res, why
	}
	log := f.log.With("client", ci.Client.String(), "from", from.String())
	route := f.sched.Route(q)
	if len(route.BEs) > 0 && route.BEs[0].Addr() == from {
		return wire.ResultStay, ""
	}
	bes := make([]netip.AddrPort, 0, len(route.BEs))
	for _, be := range route.BEs {
		if be.Addr() != from {
			bes = append(bes, be)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), moveWithin)
	defer cancel()
	start := time.Now()
	be, err := sender.Move(ctx, ci, from, bes)
	switch {
	case errors.Is(err, conntab.ErrNotForwarded):
		return wire.ResultUnknown, err.Error()
	case err != nil:
		log.Info("connection not moved; its BE serves the request", "op", "migrate", "host", q.Host, "path", q.Path, "err", err)
		return wire.ResultUpstream, err.Error()
	}
	log.Debug("connection moved", "op", "migrate", "host", q.Host, "path", q.Path, "to", be.Addr().String(), "latency", time.Since(start))
	return wire.ResultOK, ""
}

// parseMigration checks a BE's migrate request, which names a connection
// of the FE's VIP with nothing unacknowledged and a request head of at
// most maxHeader bytes at the front of its receive queue, and returns the
// connection and what the rules match of its request.
func parseMigration(fr wire.Frame, vip netip.AddrPort, maxHeader int) (*wire.ConnInfo, backends.Request, wire.Result, string) {
	var ci wire.ConnInfo
	if err := ci.UnmarshalBinary(fr.Payload); err != nil {
		return nil, backends.Request{}, wire.ResultBadFrame, err.Error()
	}
	switch {
	case ci.ConnMagic() != fr.ConnMagic:
		return nil, backends.Request{}, wire.ResultBadFrame, fmt.Sprintf("conn_magic %d does not match the connection's %d", fr.ConnMagic, ci.ConnMagic())
	case ci.VIP != vip:
		return nil, backends.Request{}, wire.ResultWrongVIP, fmt.Sprintf("connection is for %v, this FE serves %v", ci.VIP, vip)
	case len(ci.SendQueue) > 0:
		return nil, backends.Request{}, wire.ResultInvalid, "send queue not empty: only connections with nothing unacknowledged move"
	}
	head := ci.RecvQueue[:min(len(ci.RecvQueue), maxHeader)]
	h, err := phttp.ParseRequest(head)
	if err != nil {
		return nil, backends.Request{}, wire.ResultInvalid, fmt.Sprintf("no request head within %d bytes at the front of the receive queue: %v", maxHeader, err)
	}
	return &ci, backends.Request{Host: h.Host, Path: h.Path}, wire.ResultOK, ""
}

// mover moves the BE's connections (relay.Mover).
type mover struct {
	b      *be
	leaver *handoff.Leaver
}

func newMover(b *be, leaving *handoff.Leaving) mover {
	return mover{b: b, leaver: &handoff.Leaver{Ask: b.askFEs, Timeout: moveAnswer, Log: b.log, Leaving: leaving}}
}

// Moving tells whether the FE's cluster frame says phttp = multi.
func (m mover) Moving() bool {
	c := m.b.cluster.Load()
	return c != nil && c.phttp == wire.PHTTPMulti
}

func (m mover) Acked(ctx context.Context, c *net.TCPConn) error { return repair.WaitAcked(ctx, c) }

func (m mover) Move(c *net.TCPConn, pending []byte) (relay.Outcome, error) {
	err := m.leaver.Leave(context.Background(), repair.LeavingSocket{Socket: repair.Socket{Conn: c}}, pending)
	switch {
	case err == nil:
		return relay.Gone, nil
	case errors.Is(err, handoff.ErrStay):
		return relay.Local, nil
	case errors.Is(err, handoff.ErrCut):
		// Maybe another BE serves it now: a RST rather than two BEs
		// answering one connection.
		c.SetLinger(0)
		c.Close()
		return relay.Gone, err
	}
	return relay.Kept, err
}

// askFEs sends a migrate request to the FEs with sessions to this BE, on
// the least busy session of each that is not going away, one FE after
// another (handoff.Leaver.Ask).
func (b *be) askFEs(ctx context.Context, f wire.Frame) (wire.Ack, error) {
	var order []netip.Addr
	byFE := map[netip.Addr]*ctl.Session{}
	for _, s := range b.server.Sessions() {
		if s.GoingAway() {
			continue // its FE is handing over to a successor
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
	return handoff.AskInTurn(ctx, fes, f)
}
