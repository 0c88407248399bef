package handoff

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"

	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
)

// Client offers connections to BEs over the control sessions of a pool.
type Client struct {
	Pool *ctl.Pool
}

// Offer implements Peer. A session that fails under the offer (not a BE's
// refusal) fails only this attempt: the offer is made once more on another
// of the BE's sessions, and the BE, which may hold a socket rebuilt from
// the first attempt, replaces it.
func (c *Client) Offer(ctx context.Context, be netip.AddrPort, ci *wire.ConnInfo) (Offer, error) {
	payload, err := ci.MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("offer to %v: %w", be, err)
	}
	f := wire.Frame{Type: wire.TypeOffer, ConnMagic: ci.ConnMagic(), Payload: payload}
	var failed *ctl.Session
	var lastErr error
	for range 3 {
		s, err := c.Pool.Get(be, failed)
		if err != nil {
			if lastErr != nil {
				return nil, lastErr
			}
			return nil, fmt.Errorf("offer to %v: %w", be, err)
		}
		// The session is held from the offer to its commit or abort, so
		// that a BE leaving it (a handover) does not close it in between.
		if !s.Hold() {
			failed, lastErr = s, fmt.Errorf("offer to %v: %w", be, ctl.ErrGoingAway)
			continue
		}
		o, err := c.offerOn(ctx, s, be, f, ci.Client)
		if err != nil {
			s.Unhold()
			if errors.Is(err, errSessionFailed) {
				failed, lastErr = s, err
				continue
			}
			return nil, err
		}
		return o, nil
	}
	return nil, lastErr
}

var errSessionFailed = errors.New("control session failed")

func (c *Client) offerOn(ctx context.Context, s *ctl.Session, be netip.AddrPort, f wire.Frame, client netip.AddrPort) (*offer, error) {
	r, err := s.Call(ctx, f)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("offer to %v: no answer: %w", be, ctx.Err())
		}
		return nil, fmt.Errorf("offer to %v: %w: %w", be, errSessionFailed, err)
	}
	if r.Type != wire.TypeAck {
		return nil, fmt.Errorf("offer to %v: got %s, want ack", be, r.Type)
	}
	var ack wire.Ack
	if err := ack.UnmarshalBinary(r.Payload); err != nil {
		return nil, fmt.Errorf("offer to %v: %w", be, err)
	}
	if ack.Result != wire.ResultOK {
		return nil, &RefusedError{BE: be, Ack: ack}
	}
	return &offer{pool: c.Pool, s: s, be: be, id: r.ID, magic: f.ConnMagic, client: client}, nil
}

type offer struct {
	pool   *ctl.Pool
	s      *ctl.Session
	be     netip.AddrPort
	id     uint64
	magic  uint32
	client netip.AddrPort
	sent   atomic.Bool // a commit or abort was sent: the session's hold ends
}

// send delivers a commit or abort. The BE matches it by client flow, so if
// the offer's session is gone another session to the BE carries it.
func (o *offer) send(t wire.Type) error {
	if o.sent.CompareAndSwap(false, true) {
		defer o.s.Unhold()
	}
	p, _ := wire.Flow{Client: o.client}.MarshalBinary()
	f := wire.Frame{Type: t, ID: o.id, ConnMagic: o.magic, Payload: p}
	err := o.s.Send(f)
	if err == nil {
		return nil
	}
	if s, gerr := o.pool.Get(o.be, o.s); gerr == nil {
		if err = s.Send(f); err == nil {
			return nil
		}
	}
	return fmt.Errorf("send %s to %v: %w", t, o.be, err)
}

func (o *offer) Commit() error { return o.send(wire.TypeCommit) }
func (o *offer) Abort()        { o.send(wire.TypeAbort) }

// Reset tells be to reset its connection with client (a RST to the
// client): this FE stops forwarding it.
func (c *Client) Reset(ctx context.Context, be, client netip.AddrPort) error {
	p, err := wire.Flow{Client: client}.MarshalBinary()
	if err != nil {
		return err
	}
	s, err := c.Pool.Get(be, nil)
	if err != nil {
		return fmt.Errorf("reset %v on %v: %w", client, be, err)
	}
	r, err := s.Call(ctx, wire.Frame{Type: wire.TypeReset, Payload: p})
	if err != nil {
		return fmt.Errorf("reset %v on %v: %w", client, be, err)
	}
	var ack wire.Ack
	if err := ack.UnmarshalBinary(r.Payload); err != nil || r.Type != wire.TypeAck {
		return fmt.Errorf("reset %v on %v: bad answer %s", client, be, r.Type)
	}
	if ack.Result != wire.ResultOK {
		return fmt.Errorf("reset %v on %v: %v: %s", client, be, ack.Result, ack.Reason)
	}
	return nil
}

// Probe asks be for its health on one of its sessions (seed 4.9); check
// is the web server check the BE is to judge (backends.Check's text),
// which a BE of an older version ignores.
func (c *Client) Probe(ctx context.Context, be netip.AddrPort, check []byte) (wire.Health, error) {
	s, err := c.Pool.Get(be, nil)
	if err != nil {
		return wire.Health{}, fmt.Errorf("probe %v: %w", be, err)
	}
	r, err := s.Call(ctx, wire.Frame{Type: wire.TypeProbe, Payload: check})
	if err != nil {
		return wire.Health{}, fmt.Errorf("probe %v: %w", be, err)
	}
	var h wire.Health
	if r.Type != wire.TypeProbeReply {
		return h, fmt.Errorf("probe %v: got %s, want probe-reply", be, r.Type)
	}
	if err := h.UnmarshalBinary(r.Payload); err != nil {
		return h, fmt.Errorf("probe %v: %w", be, err)
	}
	return h, nil
}

// ErrNoStats is the answer of a BE too old to report its relay's
// counters.
var ErrNoStats = errors.New("the BE does not report its relay's counters")

// Stats asks be for its relay's counters on one of its sessions.
func (c *Client) Stats(ctx context.Context, be netip.AddrPort) (wire.RelayStats, error) {
	var st wire.RelayStats
	s, err := c.Pool.Get(be, nil)
	if err != nil {
		return st, fmt.Errorf("stats of %v: %w", be, err)
	}
	r, err := s.Call(ctx, wire.Frame{Type: wire.TypeStats})
	if err != nil {
		return st, fmt.Errorf("stats of %v: %w", be, err)
	}
	switch r.Type {
	case wire.TypeStatsReply:
	case wire.TypeAck:
		return st, fmt.Errorf("stats of %v: %w", be, ErrNoStats)
	default:
		return st, fmt.Errorf("stats of %v: got %s, want stats-reply", be, r.Type)
	}
	if err := st.UnmarshalBinary(r.Payload); err != nil {
		return st, fmt.Errorf("stats of %v: %w", be, err)
	}
	return st, nil
}

// IsRefusal tells a BE's negative answer from a failure to reach it.
func IsRefusal(err error) bool {
	var r *RefusedError
	return errors.As(err, &r)
}
