// Package handoff moves a client's TCP connection from the FE to a BE (seed
// 4.2, "Agile handoff"): the FE's sender blocks the connection, dumps the
// socket, offers it to a BE over a control session, and on the BE's ACK
// switches the flow to in-kernel forwarding; the BE's receiver rebuilds the
// socket and, once the FE commits, hands it to the local web server.
//
// The sequencing lives here, over small interfaces; the kernel-facing parts
// (nft sets, TCP_REPAIR) are injected, so every failure path is unit-tested.
package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"time"

	"tcpha/handoff/conntab"
	"tcpha/handoff/wire"
)

// Flows is the FE's kernel forwarding state (nft.Flows).
type Flows interface {
	Forward(ctx context.Context, flow netip.AddrPort, be netip.Addr, replace bool) error
	Unforward(ctx context.Context, flow netip.AddrPort) error
}

// Socket is the client's connection on the FE.
type Socket interface {
	// Block makes the kernel drop the client's packets to this socket, so
	// the connection stands still while it moves (HANDOFFING).
	Block() error
	// Dump enters repair mode and returns the connection's state, with
	// consumed (bytes the FE already read) back in front of the receive queue.
	Dump(consumed []byte) (*wire.ConnInfo, error)
	// CloseSilently closes a dumped socket without a packet to the client.
	CloseSilently() error
	// Resume unblocks the socket and leaves repair mode, so the FE can
	// answer the client itself.
	Resume() error
}

// Peer offers connections to BEs.
type Peer interface {
	// Offer sends the handoff request and waits for the BE's ACK. It
	// returns a *RefusedError when the BE answered with a failure.
	Offer(ctx context.Context, be netip.AddrPort, ci *wire.ConnInfo) (Offer, error)
}

// Offer is a handoff the BE accepted and now waits to start serving.
type Offer interface {
	// Commit tells the BE the flow is forwarded to it: start serving.
	Commit() error
	// Abort tells the BE to drop the rebuilt socket silently.
	Abort()
}

// RefusedError is a BE's negative handoff ACK.
type RefusedError struct {
	BE  netip.AddrPort
	Ack wire.Ack
}

func (e *RefusedError) Error() string {
	if e.Ack.Reason == "" {
		return fmt.Sprintf("BE %v refused the handoff: %v", e.BE, e.Ack.Result)
	}
	return fmt.Sprintf("BE %v refused the handoff: %v: %s", e.BE, e.Ack.Result, e.Ack.Reason)
}

// ErrNoBE means no candidate BE took the connection; it has been resumed on
// the FE, which should answer the client itself.
var ErrNoBE = errors.New("no BE accepted the connection")

// ErrTableFull means the connection was not handed off because the FE's
// table is at its capacity; the connection is untouched, for the caller
// to answer.
var ErrTableFull = errors.New("the FE's flow table is full")

// Sender is the FE's side of the handoff (the seed's SHS).
type Sender struct {
	// Capacity, if positive, bounds the table's rows, and with them the
	// elements of the kernel's per-flow sets, which are sized for it: at
	// Capacity a new connection is refused before anything changes, and
	// the FE answers it (the local node, or 503). A set that filled up
	// instead made the kernel give forwarded packets to the FE's stack,
	// which reset them (issue 19).
	Capacity int
	Flows    Flows
	Peer     Peer
	Table    *conntab.Table
	Log      *slog.Logger
	Timeout  time.Duration // per BE: request sent to ACK received (SetTimeout changes it)
	Now      func() time.Time
	// Result, if set, is told how each BE tried fared: nil when it took
	// the connection, its refusal (IsRefusal) or failure otherwise.
	Result func(be netip.AddrPort, err error)

	timeout atomic.Int64 // set by SetTimeout: overrides Timeout
}

// SetTimeout changes the time a BE has to answer, while handoffs run.
func (s *Sender) SetTimeout(d time.Duration) { s.timeout.Store(int64(d)) }

func (s *Sender) offerTimeout() time.Duration {
	if d := s.timeout.Load(); d > 0 {
		return time.Duration(d)
	}
	return s.Timeout
}

func (s *Sender) result(be netip.AddrPort, err error) {
	if s.Result != nil {
		s.Result(be, err)
	}
}

// Migrate hands the connection on sock to the first of bes that accepts it
// and returns that BE. On ErrNoBE, or any error, the connection is back in
// the FE's hands, unblocked and out of repair mode, for the caller to answer.
func (s *Sender) Migrate(ctx context.Context, sock Socket, flow netip.AddrPort, consumed []byte, bes []netip.AddrPort) (netip.AddrPort, error) {
	if len(bes) == 0 {
		return netip.AddrPort{}, ErrNoBE
	}
	if s.Capacity > 0 && s.Table.Len() >= s.Capacity {
		return netip.AddrPort{}, ErrTableFull
	}
	if err := s.Table.Begin(flow, s.Now()); err != nil {
		return netip.AddrPort{}, err
	}
	// HANDOFFING: from here the client's packets are dropped at the socket.
	// Data the FE took in after the dump would be lost, and once the socket
	// is closed the client's packets must meet the forwarding, never a
	// socket-less FE that answers RST (FACTS.md).
	if err := sock.Block(); err != nil {
		s.fail(ctx, flow)
		return netip.AddrPort{}, err
	}
	ci, err := sock.Dump(consumed)
	if err != nil {
		s.fail(ctx, flow)
		if rerr := sock.Resume(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return netip.AddrPort{}, err
	}
	be, err := s.place(ctx, flow, ci, bes, func() {
		// The FE's socket goes without a word; the BE starts serving only
		// once it is committed, now that the client's packets reach it
		// (FACTS.md).
		if err := sock.CloseSilently(); err != nil {
			s.Log.Warn("close handed-off socket", "op", "handoff", "client", flow, "err", err)
		}
	})
	if errors.Is(err, errCommitLost) {
		// The socket is gone: the client sees a stalled connection and
		// retries.
		s.Log.Error("commit lost", "op", "handoff", "client", flow, "be", be, "err", err)
		return be, nil
	}
	if err != nil {
		s.fail(ctx, flow)
		if rerr := sock.Resume(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return netip.AddrPort{}, err
	}
	return be, nil
}

// place offers the HANDOFFING flow's state ci to each of bes in turn. The
// first that accepts gets the flow's forwarding; then handed runs and the
// BE is committed. On an error (ErrNoBE, or a failed switch) the flow is
// still HANDOFFING and its forwarding unchanged, for the caller to settle.
func (s *Sender) place(ctx context.Context, flow netip.AddrPort, ci *wire.ConnInfo, bes []netip.AddrPort, handed func()) (netip.AddrPort, error) {
	for _, be := range bes {
		s.Table.Offering(flow, be.Addr())
		octx, cancel := context.WithTimeout(ctx, s.offerTimeout())
		offer, err := s.Peer.Offer(octx, be, ci)
		cancel()
		if err != nil {
			s.result(be, err)
			s.Log.Info("handoff not taken", "op", "handoff", "client", flow, "be", be, "err", err)
			continue
		}
		// The kernel first, then the table: a failed switch leaves the
		// connection HANDOFFING, from where failing is a legal step.
		prev, _ := s.Table.Get(flow)
		err = s.Flows.Forward(ctx, flow, be.Addr(), prev.Forwarded)
		if err == nil {
			_, err = s.Table.Handed(flow, be.Addr(), s.Now())
		}
		if err != nil {
			// The BE holds a rebuilt socket nobody forwards to: drop it.
			offer.Abort()
			s.result(be, err)
			return netip.AddrPort{}, fmt.Errorf("switch %v to %v: %w", flow, be, err)
		}
		handed()
		if err := offer.Commit(); err != nil {
			// The BE gives up on a missing commit and drops the socket.
			s.result(be, err)
			return be, fmt.Errorf("%w: %w", errCommitLost, err)
		}
		s.result(be, nil)
		return be, nil
	}
	return netip.AddrPort{}, ErrNoBE
}

// errCommitLost: the BE acknowledged and the flow is forwarded to it, but
// no session to it could carry the commit (it went down in between).
var errCommitLost = errors.New("commit lost")

// Move hands on a connection that the BE from gave back, dumped, because
// its next request belongs to another BE (multi-handoff, seed 4.8.2): ci
// goes to the first of bes that accepts it, and the flow's forwarding
// switches from from to that BE in one replace. Meanwhile from keeps the
// socket blocked, so the client's packets that still reach it are dropped
// (and retransmitted), never answered. On an error the connection is
// forwarded to from as before, for from to resume and serve.
func (s *Sender) Move(ctx context.Context, ci *wire.ConnInfo, from netip.Addr, bes []netip.AddrPort) (netip.AddrPort, error) {
	flow := ci.Client
	if err := s.Table.BeginMove(flow, from, s.Now()); err != nil {
		return netip.AddrPort{}, err
	}
	be, err := s.place(ctx, flow, ci, bes, func() {})
	if errors.Is(err, errCommitLost) {
		// The new BE went down between its ack and the commit. The old
		// one still holds the socket: the forwarding goes back to it, and
		// it serves the request after all.
		s.Log.Warn("commit lost; the connection goes back to its BE", "op", "migrate", "client", flow, "be", be, "err", err)
		if berr := s.Table.BeginMove(flow, be.Addr(), s.Now()); berr != nil {
			return netip.AddrPort{}, errors.Join(err, berr)
		}
		err = errors.Join(err, s.Flows.Forward(ctx, flow, from, true))
	}
	if err != nil {
		if _, herr := s.Table.Handed(flow, from, s.Now()); herr != nil {
			err = errors.Join(err, herr)
		}
		return netip.AddrPort{}, err
	}
	return be, nil
}

// Keep is for a connection the FE serves itself without trying a handoff
// (the local node). A client that reused its port may still have an earlier
// connection's forwarding installed; it must go, or the new connection's
// packets would follow it to the old BE once the flow is no longer fresh.
func (s *Sender) Keep(ctx context.Context, flow netip.AddrPort) {
	c, ok := s.Table.Get(flow)
	if !ok || !c.Forwarded {
		return
	}
	if err := s.Flows.Unforward(ctx, flow); err != nil {
		s.Log.Error("remove stale forwarding", "op", "local", "client", flow, "err", err)
	}
	if err := s.Table.Expire(flow); err != nil {
		s.Log.Error("connection table", "op", "local", "client", flow, "err", err)
	}
}

// fail ends HANDOFFING without a handoff: forget the entry and remove a
// stale forward of an earlier connection on the same port. The caller then
// resumes the socket.
func (s *Sender) fail(ctx context.Context, flow netip.AddrPort) {
	stale, err := s.Table.Failed(flow)
	if err != nil {
		s.Log.Error("connection table", "op", "handoff", "client", flow, "err", err)
	}
	if stale {
		if err := s.Flows.Unforward(ctx, flow); err != nil {
			s.Log.Error("remove stale forwarding", "op", "handoff", "client", flow, "err", err)
		}
	}
}
