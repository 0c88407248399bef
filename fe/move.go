package fe

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"tcpha/backends"
	"tcpha/handoff/conntab"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
	"tcpha/phttp"
)

// Multi-handoff (phttp = multi, TCPHA 0.3): a BE whose connection's next
// request belongs to another BE gives the connection back to the FE that
// forwards it (handoff.Leaver), and the FE hands it on like a new one
// (handoff.Sender.Move), switching its forwarding in one replace.

// moveWithin bounds a migration: the FE settles it within this (its
// offers included) and answers; the BE waits longer for that answer, so
// that only an FE that is gone leaves the outcome unknown.
const moveWithin = 4 * time.Second

// maxMoves bounds the migrations an FE carries out at once.
const maxMoves = 256

// serveBE serves the requests a BE starts on the FE's control sessions:
// migrations. Each runs in its own goroutine, at most maxMoves at once.
func (f *FE) serveBE(s *ctl.Session, fr wire.Frame) {
	do := f.migrate
	switch fr.Type {
	case wire.TypeMigrate:
	case wire.TypeSwitch:
		do = f.switchFlow
	default:
		f.log.Warn("unexpected control frame", "op", "control", "type", fr.Type.String(), "peer", s.Remote.String())
		s.Reply(fr, ctl.AckFrame(wire.ResultInvalid, "unexpected "+fr.Type.String()))
		return
	}
	f.admitMove(s.Remote.Addr(), fr, do, func(res wire.Result, why string) { s.Reply(fr, ctl.AckFrame(res, why)) })
}

// admitMove carries out the migration or switch (do) from asks for,
// unless maxMoves are under way (then the BE serves the request itself),
// and answers with reply.
func (f *FE) admitMove(from netip.Addr, fr wire.Frame, do func(netip.Addr, wire.Frame) (wire.Result, string), reply func(wire.Result, string)) {
	if !f.active() {
		// A standby's rows are the active FE's: the BE asks that one
		// (handoff.AskFEs takes the answer of the FE that knows it).
		f.notMoved.Add(1)
		reply(wire.ResultUnknown, "standby FE: the VIP is on the other FE")
		return
	}
	select {
	case f.moves <- struct{}{}:
	default:
		f.m.Migrations.WithLabelValues(wire.ResultBusy.String()).Inc()
		f.notMoved.Add(1)
		reply(wire.ResultBusy, "too many migrations in progress")
		return
	}
	go func() {
		defer func() { <-f.moves }()
		res, why := do(from, fr)
		f.m.Migrations.WithLabelValues(res.String()).Inc()
		if res == wire.ResultOK {
			f.moved.Add(1)
		} else {
			f.notMoved.Add(1)
		}
		reply(res, why)
	}()
}

// Mover moves a connection a BE gave back to one of bes
// (handoff.Sender.Move).
type Mover interface {
	Move(ctx context.Context, ci *wire.ConnInfo, from netip.Addr, bes []netip.AddrPort) (netip.AddrPort, error)
}

// stopMoves refuses migrations from now on (busy: the BE serves the request
// itself, and its next one may move through the successor) and waits until
// those under way have ended or ctx does: the connection table is about to
// go to a successor.
func (f *FE) stopMoves(ctx context.Context) {
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
func (f *FE) migrate(from netip.Addr, fr wire.Frame) (wire.Result, string) {
	sender := f.mover.Load()
	if sender == nil || *sender == nil {
		return wire.ResultBusy, "the FE is starting or handing over"
	}
	if wire.PHTTP(f.phttp.Load()) != wire.PHTTPMulti && !f.acceptBE() {
		return wire.ResultInvalid, "phttp is not multi on this FE"
	}
	ci, q, res, why := parseMigration(fr, netip.AddrPortFrom(f.cfg.VAddr, f.cfg.Port), f.cfg.MaxHeader)
	if res != wire.ResultOK {
		return res, why
	}
	log := f.log.With("client", ci.Client.String(), "from", from.String())
	stay, bes := moveTargets(f.sched.Route(q).BEs, from)
	if stay {
		return wire.ResultStay, ""
	}
	if f.place != nil {
		// A flow the packet path placed: the kernel says who holds it.
		if _, err := f.adoptPinned(ci.Client, from); err != nil {
			log.Warn("move refused", "op", "migrate", "err", err)
			return wire.ResultUnknown, err.Error()
		}
		defer f.dropMoved(ci.Client, from)
	}
	ctx, cancel := context.WithTimeout(context.Background(), moveWithin)
	defer cancel()
	start := time.Now()
	be, err := (*sender).Move(ctx, ci, from, bes)
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

// switchFlow carries out a BE-to-BE move's switch (handoff.Direct): the
// BE from, which holds the flow, had it rebuilt on another BE and asks
// for its forwarding to go there. The FE takes it only from the BE its
// table (or, with accept = be, its kernel) says holds the flow, and only
// to a BE that takes connections; the element is replaced in one
// transaction.
func (f *FE) switchFlow(from netip.Addr, fr wire.Frame) (wire.Result, string) {
	var sw wire.Switch
	if err := sw.UnmarshalBinary(fr.Payload); err != nil {
		return wire.ResultBadFrame, err.Error()
	}
	if sender := f.mover.Load(); sender == nil || *sender == nil {
		// The flow table is going to a successor: the BE asks again.
		return wire.ResultBusy, "the FE is starting or handing over"
	}
	log := f.log.With("client", sw.Client.String(), "from", from.String(), "to", sw.To.String())
	if sw.To == from || !f.sched.Available(sw.To) {
		log.Warn("switch refused: not a BE that takes connections", "op", "migrate")
		return wire.ResultInvalid, fmt.Sprintf("%v is not another BE that takes connections", sw.To)
	}
	if f.switchedAlready(sw.Client, from, sw.To) {
		log.Info("switch asked again: the flow is forwarded there already", "op", "migrate")
		return wire.ResultOK, ""
	}
	if f.place != nil {
		if _, err := f.adoptPinned(sw.Client, from); err != nil {
			log.Warn("switch refused", "op", "migrate", "err", err)
			return wire.ResultUnknown, err.Error()
		}
		defer f.dropMoved(sw.Client, from)
	}
	now := time.Now()
	if err := f.table.BeginMove(sw.Client, from, now); err != nil {
		log.Warn("switch refused", "op", "migrate", "err", err)
		return wire.ResultUnknown, err.Error()
	}
	ctx, cancel := context.WithTimeout(context.Background(), moveWithin)
	defer cancel()
	if err := f.flows.Forward(ctx, sw.Client, sw.To, true); err != nil {
		if _, herr := f.table.Handed(sw.Client, from, time.Now()); herr != nil {
			err = errors.Join(err, herr)
		}
		log.Warn("switch failed; the flow stays with its BE", "op", "migrate", "err", err)
		return wire.ResultUpstream, err.Error()
	}
	if _, err := f.table.Handed(sw.Client, sw.To, time.Now()); err != nil {
		log.Error("connection table after a switch", "op", "migrate", "err", err)
	}
	f.switched.add(sw.Client, from, sw.To, time.Now())
	// The BE took a connection, as from a handoff the FE made itself
	// (tcphactl backends, rates, tcpha_backend_handoffs_total).
	f.sched.Handed(sw.To)
	log.Debug("connection switched", "op", "migrate", "latency", time.Since(now))
	return wire.ResultOK, ""
}

// moveTargets is the move filter: a connection whose next request's first
// choice is the BE it is on stays there; otherwise it may go to any BE
// the route names but that one, in the route's order.
func moveTargets(route []netip.AddrPort, from netip.Addr) (stay bool, bes []netip.AddrPort) {
	if len(route) > 0 && route[0].Addr() == from {
		return true, nil
	}
	bes = make([]netip.AddrPort, 0, len(route))
	for _, be := range route {
		if be.Addr() != from {
			bes = append(bes, be)
		}
	}
	return false, bes
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
