package conntab

import (
	"context"
	"log/slog"
	"net/netip"
	"time"
)

// Reaper ends the forwarding of flows whose time is up: TIME_WAIT over, or
// idle too long. The kernel side is injected.
type Reaper struct {
	Table *Table
	// Unforward removes a flow's forwarding from the kernel.
	Unforward func(ctx context.Context, flow netip.AddrPort) error
	// Alive reports which flows carried packets within Idle (the kernel's
	// alive set); nil disables idle expiry.
	Alive     func(ctx context.Context) (func(netip.AddrPort) bool, error)
	Idle      time.Duration
	Tick      time.Duration // how often TIME_WAIT deadlines are checked
	IdleEvery time.Duration // how often the alive set is read
	Log       *slog.Logger
}

// Run reaps until ctx is done.
func (r *Reaper) Run(ctx context.Context) {
	tick := time.NewTicker(r.Tick)
	defer tick.Stop()
	lastIdle := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		r.Once(ctx, &lastIdle)
	}
}

// Once does one round; lastIdle is when the alive set was last read.
func (r *Reaper) Once(ctx context.Context, lastIdle *time.Time) {
	if r.Table.Len() == 0 {
		return
	}
	now := time.Now()
	var alive func(netip.AddrPort) bool
	if r.Alive != nil && now.Sub(*lastIdle) >= r.IdleEvery {
		*lastIdle = now
		a, err := r.Alive(ctx)
		if err != nil {
			r.Log.Warn("read alive flows", "op", "expire", "err", err)
		} else {
			alive = a
		}
	}
	for _, k := range r.Table.Expired(now, r.Idle, alive) {
		if err := r.Unforward(ctx, k); err != nil {
			// The entry goes anyway: a forward element that cannot be
			// deleted is missing already, and keeping the entry would
			// retry forever.
			r.Log.Warn("unforward", "op", "expire", "client", k.String(), "err", err)
		}
		if err := r.Table.Expire(k); err != nil {
			r.Log.Error("connection table", "op", "expire", "client", k.String(), "err", err)
		}
		r.Log.Debug("forwarding ended", "op", "expire", "client", k.String())
	}
}
