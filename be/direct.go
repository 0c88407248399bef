package be

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"tcpha/backends"
	"tcpha/handoff"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
	"tcpha/phttp"
)

// BEs hand connections to each other directly (seed 4.8.2, issue 14):
// each BE keeps a control session to every other BE of the FE's cluster
// frame, authenticated with the cluster's secret, and moves a connection
// whose request belongs elsewhere over it (handoff.Direct), asking the FE
// only to switch the flow's forwarding. The FE stays the only host that
// forwards.

// peerFrames are the frames a BE takes from another BE: a move's offer,
// commit and abort. Nothing else (a reset, a held question) is a BE's to
// ask.
var peerFrames = []wire.Type{wire.TypeOffer, wire.TypeCommit, wire.TypeAbort}

// clusterPeers are the other BEs of cluster c, at their control ports.
func (b *BE) clusterPeers(c *beCluster) []netip.AddrPort {
	var out []netip.AddrPort
	for _, s := range c.sched.Servers() {
		if s.Addr != b.cfg.RAddr {
			out = append(out, s.AddrPort())
		}
	}
	return out
}

// setPeers makes the BE-to-BE sessions follow cluster c: one session to
// each of its other BEs. Those BEs may open sessions here too (isPeer).
func (b *BE) setPeers(c *beCluster) {
	peers := b.clusterPeers(c)
	b.peerMu.Lock()
	defer b.peerMu.Unlock()
	if b.peers == nil {
		return // stopping
	}
	for _, p := range b.peers.Peers() {
		if !slices.Contains(peers, p) {
			b.peers.Remove(p)
		}
	}
	for _, p := range peers {
		b.peers.Add(p) // a peer already there is kept
	}
}

// isPeer tells whether a is another BE of the FE's cluster frame.
func (b *BE) isPeer(a netip.Addr) bool {
	c := b.cluster.Load()
	if c == nil || a == b.cfg.RAddr {
		return false
	}
	return slices.ContainsFunc(c.sched.Servers(), func(s backends.Server) bool { return s.Addr == a })
}

// controlAddrs are the control addresses of the BEs as, in order, by the
// FE's cluster frame; one it does not name is left out.
func (b *BE) controlAddrs(as []netip.Addr) []netip.AddrPort {
	c := b.cluster.Load()
	if c == nil {
		return nil
	}
	servers := c.sched.Servers()
	var out []netip.AddrPort
	for _, a := range as {
		if i := slices.IndexFunc(servers, func(s backends.Server) bool { return s.Addr == a }); i >= 0 && a != b.cfg.RAddr {
			out = append(out, servers[i].AddrPort())
		}
	}
	return out
}

// directTargets are the BEs the request at the front of pending goes to,
// in the FE's order, less this one; stay says it is this BE's.
func (b *BE) directTargets(pending []byte) (targets []netip.AddrPort, stay bool, err error) {
	c := b.cluster.Load()
	if c == nil {
		return nil, false, errors.New("no cluster frame from the FE yet")
	}
	h, err := phttp.ParseRequest(pending[:min(len(pending), b.cfg.MaxHeader)])
	if err != nil {
		return nil, false, fmt.Errorf("the request to move: %w", err)
	}
	q := backends.Request{Host: h.Host, Path: h.Path}
	if c.sched.Holds(q, b.cfg.RAddr) {
		return nil, true, nil
	}
	for _, be := range c.sched.Route(q).BEs {
		if be.Addr() != b.cfg.RAddr {
			targets = append(targets, be)
		}
	}
	return targets, false, nil
}

// switchAt asks the FEs to forward flow to to (handoff.Direct.Switch).
func (b *BE) switchAt(ctx context.Context, flow netip.AddrPort, to netip.Addr) error {
	p, err := wire.Switch{Client: flow, To: to}.MarshalBinary()
	if err != nil {
		return fmt.Errorf("%w: %w", ctl.ErrNotSent, err)
	}
	busyUntil := time.Now().Add(switchBusy)
	for {
		// While an FE has not answered (it may have died with the
		// request), a standby that takes over is asked again.
		ack, err := handoff.AskFEsAgain(ctx, b.fesToAsk(), wire.Frame{Type: wire.TypeSwitch, Payload: p}, switchAgain)
		again := time.Now().Before(busyUntil)
		switch {
		case errors.Is(err, ctl.ErrNotSent) && again, err == nil && ack.Result == wire.ResultBusy && again:
			// The FE hands its table to a successor (an upgrade: for a
			// moment no session is up, then it answers busy), or has too
			// many moves under way: nothing changed, so ask again while
			// the other BE holds the offer, rather than fall back.
			select {
			case <-ctx.Done():
				return fmt.Errorf("%w: busy: %s", handoff.ErrRefused, ack.Reason)
			case <-time.After(switchRetry):
			}
			continue
		case err != nil:
			return err
		case ack.Result != wire.ResultOK:
			return fmt.Errorf("%w: %v: %s", handoff.ErrRefused, ack.Result, ack.Reason)
		}
		return nil
	}
}

// switchRetry is how soon a BE asks again for a switch the FE answered
// busy, for at most switchBusy: well within the other BE's wait for the
// commit (committimeout, 5 s), and longer than an FE's handover (tens of
// milliseconds).
const (
	switchRetry = 20 * time.Millisecond
	switchBusy  = time.Second
)

// switchAgain is how often a BE asks the FEs that answered unknown flow
// again while another FE has not answered its switch: a syncpeer
// standby takes over ~3.5 s after the active FE dies (VRRP, advert_int 1),
// and the other BE holds the offer for committimeout (5 s).
const switchAgain = 100 * time.Millisecond
