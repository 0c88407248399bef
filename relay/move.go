package relay

import (
	"context"
	"net"
	"net/netip"
	"time"

	"tcpha/handoff/conntab"
	"tcpha/phttp"
)

// Mover moves client connections to other BEs (multi-handoff).
type Mover interface {
	// Moving tells whether connections move now (phttp = multi).
	Moving() bool
	// Acked waits until the client acknowledged every byte sent on c:
	// only such a connection may move (WILLHANDOFF).
	Acked(ctx context.Context, c *net.TCPConn) error
	// Move hands c on, with pending (bytes read, not served) back in
	// front of its receive queue: to the BEs to, in order, if given (a
	// first request this BE's scheduler placed: Rules.To), else where the
	// mover routes the request. Unless it returns Gone, c is back in this
	// BE's hands, usable.
	Move(c *net.TCPConn, pending []byte, to []netip.Addr) (Outcome, error)
}

// Outcome is where a Mover left a connection.
type Outcome int

const (
	// Kept: still here; serve the request as its Plan says (back-end
	// forwarding, or 503).
	Kept Outcome = iota
	// Local: still here, and the request is this BE's after all.
	Local
	// Gone: another BE's now (or reset, when the move's outcome was
	// unknown); the session ends without touching the socket.
	Gone
)

// ackWait bounds WILLHANDOFF: a client that leaves a response
// unacknowledged this long gets its request served from here.
const ackWait = time.Second

// move moves the connection to the BE its next request h belongs to, if
// plan says another BE takes it and connections move (phttp = multi), and
// says where the connection is: Gone from here, or Kept (or Local, when the
// FE says the request is this BE's after all) for the request to be served
// from here as plan says; and how long the move, or the attempt, took (0:
// none).
func (s *session) move(h *phttp.Head, plan Plan) (Outcome, time.Duration) {
	m := s.r.cfg.Mover
	// The first request of a connection this BE accepted moves whatever
	// phttp says: no FE routed it.
	if m == nil || !plan.Move || !(m.Moving() || s.accepted && !s.later()) {
		return Kept, 0
	}
	// WILLHANDOFF: no further request is read; every response sent must
	// be acknowledged first, or the new BE could not retransmit it.
	start := time.Now()
	s.step(conntab.EvReschedule)
	ctx, cancel := context.WithTimeout(context.Background(), ackWait)
	out, err := Kept, m.Acked(ctx, s.client)
	cancel()
	acked := time.Since(start)
	if err == nil {
		s.step(conntab.EvHandoffStart)
		out, err = m.Move(s.client, s.buf[s.start:s.end], plan.To)
	}
	switch {
	case out == Gone && err != nil:
		s.logf().Warn("connection reset: its migration's outcome is unknown", "op", "migrate", "path", h.Path, "err", err)
	case out == Gone:
		s.step(conntab.EvHandoffAcked)
		s.step(conntab.EvFEAcked)
		s.r.moves.Add(1)
		s.logf().Debug("connection moved", "op", "migrate", "path", h.Path, "acked", acked, "latency", time.Since(start))
	case out == Kept:
		s.logf().Info("connection not moved: the request is fetched from its BE's web server", "op", "migrate", "path", h.Path, "err", err)
	}
	if out == Gone {
		// The unserved bytes went with the connection.
		s.handOff, s.start = true, s.end
		s.release()
	} else {
		s.step(conntab.EvHandoffFailed)
	}
	if out == Kept || out == Gone && err != nil {
		s.r.moveFailures.Add(1)
	}
	return out, time.Since(start)
}

// step moves the session's state on ev (the BE's state machine).
func (s *session) step(ev conntab.Event) {
	from := conntab.State(s.state.Load())
	to, _, err := conntab.Step(conntab.BE, from, ev)
	if err != nil {
		s.logf().Error("connection state", "op", "migrate", "err", err)
		return
	}
	s.state.Store(uint32(to))
}
