package handoff

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"tcpha/handoff/ctl"
)

// Direct moves a BE's connection straight to another BE (seed 4.8.2, "BE
// hands connections to each other"), in this order:
//
//  1. this BE blocks and dumps the connection;
//  2. it offers it to the other BE over a BE-to-BE control session;
//  3. the other BE rebuilds it and acks;
//  4. this BE asks the FE, in one frame, to switch the flow's forwarding
//     there; the FE takes it only from the BE that holds the flow;
//  5. this BE commits to the other BE and closes its socket silently.
//
// The FE's cost per move is one frame in, one element edit and one frame
// out (the trip through the FE, Leaver, costs it the offer too). Every
// message may be lost; each outcome leaves exactly one BE answering the
// client, or the client reset, never two BEs, never a silent hang:
//
//   - no offer taken: the connection is resumed here (ErrNoBE);
//   - the FE refused the switch, or never saw it: the offer is aborted and
//     the connection resumed here;
//   - the FE saw the switch but its answer never came: the offer is
//     aborted (the other BE drops its socket, and a packet that reaches it
//     is reset by its stack) and the connection resumed for the caller to
//     reset (ErrCut): whichever BE the FE forwards to, the client is reset;
//   - the commit could not be sent (the other BE went down after its ack):
//     the FE forwards to a BE that drops the socket; the connection is
//     resumed for the caller to reset (ErrCut).
//
// In the last case the socket is still here, blocked: it is closed only
// once the commit went out, so a resumed connection can always be reset.
type Direct struct {
	// Peer offers the connection to other BEs (Client over the BE-to-BE
	// pool).
	Peer Peer
	// Switch asks the FE that forwards flow to forward it to to. An error
	// wrapping ctl.ErrNotSent says no FE saw the request, one wrapping
	// ErrRefused that an FE refused it; any other error leaves the
	// forwarding unknown.
	Switch func(ctx context.Context, flow netip.AddrPort, to netip.Addr) error
	// Timeout bounds each offer, SwitchTimeout the FE's answer.
	Timeout, SwitchTimeout time.Duration
	Log                    *slog.Logger
	// Leaving, shared with the BE's Receiver, holds the connections on
	// their way out.
	Leaving *Leaving
}

// ErrRefused wraps an FE's refusal of a switch.
var ErrRefused = errors.New("the FE refused the switch")

// Leave moves the connection on sock, whose client has acknowledged every
// byte sent, to the first of bes that takes it, with pending (read, not
// served) back in front of its receive queue, and returns that BE. On any
// error sock is back in this BE's hands, unblocked and out of repair mode:
// ErrCut means reset it, anything else serve the request from here.
func (d *Direct) Leave(ctx context.Context, sock Socket, pending []byte, bes []netip.AddrPort) (netip.AddrPort, error) {
	if len(bes) == 0 {
		return netip.AddrPort{}, ErrNoBE
	}
	if err := sock.Block(); err != nil {
		return netip.AddrPort{}, err
	}
	ci, err := sock.Dump(pending)
	var be netip.AddrPort
	if err == nil {
		defer d.Leaving.add(ci.Client)() // after the close or the resume
		if len(ci.SendQueue) > 0 {
			err = fmt.Errorf("%d bytes not acknowledged by the client: a connection moves only with none", len(ci.SendQueue))
		} else {
			be, err = d.leave(ctx, sock, ci.Client, func(ctx context.Context, to netip.AddrPort) (Offer, error) {
				return d.Peer.Offer(ctx, to, ci)
			}, bes)
		}
	}
	if err != nil {
		if rerr := sock.Resume(); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return netip.AddrPort{}, err
	}
	return be, nil
}

func (d *Direct) leave(ctx context.Context, sock Socket, flow netip.AddrPort,
	offerTo func(context.Context, netip.AddrPort) (Offer, error), bes []netip.AddrPort) (netip.AddrPort, error) {
	for _, be := range bes {
		octx, cancel := context.WithTimeout(ctx, d.Timeout)
		offer, err := offerTo(octx, be)
		cancel()
		if err != nil {
			d.Log.Info("move not taken", "op", "migrate", "client", flow.String(), "be", be.String(), "err", err)
			continue
		}
		sctx, cancel := context.WithTimeout(ctx, d.SwitchTimeout)
		err = d.Switch(sctx, flow, be.Addr())
		cancel()
		switch {
		case errors.Is(err, ctl.ErrNotSent) || errors.Is(err, ErrRefused):
			offer.Abort()
			return netip.AddrPort{}, fmt.Errorf("switch %v to %v: %w", flow, be, err)
		case err != nil:
			offer.Abort()
			return netip.AddrPort{}, fmt.Errorf("switch %v to %v: %w: %w", flow, be, ErrCut, err)
		}
		if err := offer.Commit(); err != nil {
			return netip.AddrPort{}, fmt.Errorf("commit %v to %v: %w: %w", flow, be, ErrCut, err)
		}
		if err := sock.CloseSilently(); err != nil {
			d.Log.Warn("close moved socket", "op", "migrate", "client", flow.String(), "err", err)
		}
		return be, nil
	}
	return netip.AddrPort{}, ErrNoBE
}
