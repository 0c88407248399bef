package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
)

// The BE's side of a multi-handoff (TCPHA 0.3, seed 4.8.2): a BE whose
// connection's next request belongs to another BE gives the connection back
// to its FE, dumped, with the request in front of its receive queue; the FE
// hands it to the right BE like a new one and switches its forwarding
// there in one replace. The FE stays the only host that forwards, so BEs
// need no sessions, trust or forwarding among themselves.

// Errors of Leave.
var (
	// ErrStay: the FE routes the request to this BE after all (its rules
	// changed since this BE learnt them). The connection is resumed here.
	ErrStay = errors.New("the FE routes the request to this BE")
	// ErrCut: nobody can say whether the FE moved the connection (its
	// answer never came); it was resumed here for the caller to reset,
	// since two BEs answering one connection would corrupt it.
	ErrCut = errors.New("the FE did not answer a migration it may have carried out")
)

// Leaver gives connections back to their FE.
type Leaver struct {
	// Ask sends the migrate request to the FEs that may forward the
	// connection, one after another, until one knows it (an answer other
	// than ResultUnknown). An error that wraps ctl.ErrNotSent says no FE
	// saw the request.
	Ask func(ctx context.Context, f wire.Frame) (wire.Ack, error)
	// Timeout bounds the wait for the FE's answer, which covers its offers
	// to other BEs.
	Timeout time.Duration
	Log     *slog.Logger
	// Leaving, shared with the BE's Receiver, holds the connections
	// under way out.
	Leaving *Leaving
}

// FE is one FE a Leaver may ask, through one of its control sessions.
type FE struct {
	Addr netip.Addr
	Call func(ctx context.Context, f wire.Frame) (wire.Frame, error)
}

// AskFEs sends the migrate request f to every FE of fes at once and
// returns the first answer other than unknown flow: at most one FE forwards
// a connection (with [fe] syncpeer the standby knows it too, but answers
// unknown flow until it holds the VIP). Asking one FE after another let an
// FE that died without closing its sessions (a host or link failure: the
// BE sees nothing for 30 s) spend the whole answer bound before the live
// one was asked, so the connection was cut; the calls still waiting when an
// answer comes are cancelled. When every FE that answered does not know
// the connection, the answer is unknown flow. An error wraps ctl.ErrNotSent
// when no FE can have seen f; any other error means one may have acted on
// it without answering, so the connection's fate is unknown.
func AskFEs(ctx context.Context, fes []FE, f wire.Frame) (wire.Ack, error) {
	return askFEs(ctx, fes, f, 0)
}

// AskFEsAgain is AskFEs that, while an FE has not answered, asks the FEs
// that answered unknown flow again every every: a standby FE answers
// unknown flow until it holds the VIP, and when the active FE died with
// the request (a failover of a syncpeer pair), the standby that takes
// over can answer it (issue 17: a BE-to-BE move caught by a failover was
// cut, since the dead FE might have switched the flow). The request must
// be one an FE can answer twice: a switch already carried out is answered
// OK (fe.switchFlow).
func AskFEsAgain(ctx context.Context, fes []FE, f wire.Frame, every time.Duration) (wire.Ack, error) {
	return askFEs(ctx, fes, f, every)
}

func askFEs(ctx context.Context, fes []FE, f wire.Frame, every time.Duration) (wire.Ack, error) {
	if len(fes) == 0 {
		return wire.Ack{}, fmt.Errorf("%w: no control session from an FE", ctl.ErrNotSent)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type answer struct {
		fe  FE
		r   wire.Frame
		err error
	}
	// At most one call per FE is out at a time: the calls never block on
	// the channel.
	answers := make(chan answer, len(fes))
	ask := func(fe FE) {
		go func() {
			r, err := fe.Call(ctx, f)
			answers <- answer{fe, r, err}
		}()
	}
	for _, fe := range fes {
		ask(fe)
	}
	out := len(fes)  // calls not answered yet
	var unknown []FE // FEs whose last answer was unknown flow
	var tick <-chan time.Time
	if every > 0 {
		t := time.NewTicker(every)
		defer t.Stop()
		tick = t.C
	}
	sent := false
	var fail error
	for out > 0 {
		var again <-chan time.Time
		if len(unknown) > 0 {
			again = tick // nil without every: never
		}
		select {
		case <-again:
			for _, fe := range unknown {
				ask(fe)
			}
			out += len(unknown)
			unknown = unknown[:0]
			continue
		case a := <-answers:
			out--
			if a.err != nil {
				sent = sent || !errors.Is(a.err, ctl.ErrNotSent)
				fail = a.err
				continue
			}
			var ack wire.Ack
			if err := ack.UnmarshalBinary(a.r.Payload); err != nil || a.r.Type != wire.TypeAck {
				// An answer came: whatever it says, the FE saw the request.
				return wire.Ack{}, fmt.Errorf("FE %v: bad answer to migrate: %v %w", a.fe.Addr, a.r.Type, err)
			}
			if ack.Result != wire.ResultUnknown {
				return ack, nil
			}
			unknown = append(unknown, a.fe)
		}
	}
	switch {
	case sent:
		return wire.Ack{}, fail
	case fail != nil:
		return wire.Ack{}, fmt.Errorf("%w: %w", ctl.ErrNotSent, fail)
	}
	return wire.Ack{Result: wire.ResultUnknown, Reason: "no FE forwards this connection"}, nil
}

// Leaving is the set of connections a BE is moving away. The FE answers a
// migration before the BE has closed its socket, and a client quick with
// its next request may bring the connection back at once: its rebuild
// waits until the old socket is gone, which otherwise holds the 4-tuple.
type Leaving struct {
	mu sync.Mutex
	m  map[netip.AddrPort]chan struct{}
}

// add marks client as leaving until the returned function is called.
func (l *Leaving) add(client netip.AddrPort) func() {
	if l == nil {
		return func() {}
	}
	ch := make(chan struct{})
	l.mu.Lock()
	if l.m == nil {
		l.m = map[netip.AddrPort]chan struct{}{}
	}
	l.m[client] = ch
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		if l.m[client] == ch {
			delete(l.m, client)
		}
		l.mu.Unlock()
		close(ch)
	}
}

// Wait waits up to d until client is not leaving, and tells whether it
// is not.
func (l *Leaving) Wait(client netip.AddrPort, d time.Duration) bool {
	if l == nil {
		return true
	}
	l.mu.Lock()
	ch := l.m[client]
	l.mu.Unlock()
	if ch == nil {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		return false
	}
}

// Leave moves the connection on sock, whose client has acknowledged every
// byte sent (WILLHANDOFF is the caller's), to another BE through the FE.
// pending are bytes read and not served: the next request and any behind
// it; they go back in front of the receive queue. It returns nil once the
// connection is another BE's and sock is closed without a packet to the
// client. Otherwise sock is back in this BE's hands, unblocked and out of
// repair mode: ErrStay and refusals mean serve the request here, ErrCut
// means reset the connection.
func (l *Leaver) Leave(ctx context.Context, sock Socket, pending []byte) error {
	// HANDOFFING: the client's packets are dropped at the socket from now
	// on; the client retransmits them to whoever owns the connection next.
	if err := sock.Block(); err != nil {
		return err
	}
	ci, err := sock.Dump(pending)
	if err == nil {
		defer l.Leaving.add(ci.Client)() // after the close or the resume
		err = l.leave(ctx, sock, ci)
	}
	if err != nil {
		if rerr := sock.Resume(); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

func (l *Leaver) leave(ctx context.Context, sock Socket, ci *wire.ConnInfo) error {
	if len(ci.SendQueue) > 0 {
		return fmt.Errorf("%d bytes not acknowledged by the client: a connection moves only with none", len(ci.SendQueue))
	}
	payload, err := ci.MarshalBinary()
	if err != nil {
		return err
	}
	actx, cancel := context.WithTimeout(ctx, l.Timeout)
	defer cancel()
	ack, err := l.Ask(actx, wire.Frame{Type: wire.TypeMigrate, ConnMagic: ci.ConnMagic(), Payload: payload})
	switch {
	case errors.Is(err, ctl.ErrNotSent):
		return fmt.Errorf("migrate %v: %w", ci.Client, err)
	case err != nil:
		return fmt.Errorf("migrate %v: %w: %w", ci.Client, ErrCut, err)
	case ack.Result == wire.ResultOK:
		if err := sock.CloseSilently(); err != nil {
			l.Log.Warn("close migrated socket", "op", "migrate", "client", ci.Client.String(), "err", err)
		}
		return nil
	case ack.Result == wire.ResultStay:
		return ErrStay
	}
	return fmt.Errorf("migrate %v: the FE refused: %v: %s", ci.Client, ack.Result, ack.Reason)
}
