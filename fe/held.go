package fe

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"time"

	"tcpha/handoff/ctl"
)

// A BE can end a connection without the FE seeing it: when its agent dies
// its kernel resets the clients directly (issue 19: 21 rows left after a
// crash), and a FIN the FE missed leaves a row HANDOFFED too. Such rows
// keep their forwarding and count toward the BE's live connections (wlc)
// until idletimeout. So the FE asks each BE which client flows it holds
// whenever a control session to it comes up (a BE that restarted holds
// nothing) and every heldEvery, and ends the rows the BE no longer has as
// if a RST had been seen: TIME_WAIT, then the reaper removes the
// forwarding.

// heldEvery is how often every BE is asked without a new session.
const heldEvery = 30 * time.Second

// heldAsks are the BEs waiting to be asked, and the signal that there are
// some. The zero value is ready.
type heldAsks struct {
	mu      sync.Mutex
	pending map[netip.AddrPort]bool
	kick    chan struct{}
}

func (h *heldAsks) signal() chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.kick == nil {
		h.kick = make(chan struct{}, 1)
	}
	return h.kick
}

// add queues be for a question. The BE's sessions come up one by one:
// those that come up while it is asked queue one more question, not one
// each.
func (h *heldAsks) add(be netip.AddrPort) {
	h.mu.Lock()
	if h.pending == nil {
		h.pending = map[netip.AddrPort]bool{}
	}
	h.pending[be] = true
	h.mu.Unlock()
	select {
	case h.signal() <- struct{}{}:
	default:
	}
}

func (h *heldAsks) take() []netip.AddrPort {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]netip.AddrPort, 0, len(h.pending))
	for be := range h.pending {
		out = append(out, be)
	}
	clear(h.pending)
	return out
}

// heldLoop asks BEs what they hold: those whose session came up, and every
// heldEvery all of them.
func (f *FE) heldLoop(ctx context.Context) {
	t := time.NewTicker(heldEvery)
	defer t.Stop()
	kick := f.held.signal()
	for {
		var bes []netip.AddrPort
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			bes = f.pool.Peers()
		case <-kick:
			bes = f.held.take()
		}
		for _, be := range bes {
			f.askHeld(ctx, be)
		}
	}
}

// askHeld asks be which flows it holds and ends the rows of be it does not
// hold that were handed off before the question.
func (f *FE) askHeld(ctx context.Context, be netip.AddrPort) {
	asked := time.Now()
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	held, err := f.client.Held(actx, be)
	cancel()
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return
	case errors.Is(err, ctl.ErrNoSession):
		// A BE that is down is asked once its session is back.
		f.log.Debug("BE not asked which connections it holds", "op", "held", "be", be.String(), "err", err)
		return
	default:
		f.log.Info("BE not asked which connections it holds", "op", "held", "be", be.String(), "err", err)
		return
	}
	gone := f.table.Unheld(be.Addr(), asked, func(k netip.AddrPort) bool { return held[k] })
	ended := 0
	for _, r := range gone {
		now := time.Now()
		if f.table.CloseIf(r.Flow, r.Since, now, now.Add(f.obs.RSTWait)) {
			ended++
			f.log.Debug("connection its BE no longer holds: forwarding ends", "op", "held", "client", r.Flow.String(),
				"be", be.String())
		}
	}
	if ended > 0 {
		f.log.Info("connections their BE no longer holds: forwarding ends", "op", "held", "be", be.String(),
			"connections", ended, "held", len(held))
	}
}
