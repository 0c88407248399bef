package conntab

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"time"
)

// Reaper ends the forwarding of flows whose time is up: TIME_WAIT over, or
// idle too long. Every IdleEvery it also reconciles the table with the
// kernel's forward map, so that no row outlives its flow's forwarding and
// no forwarding outlives its row, whatever failed in between. The kernel
// side is injected.
type Reaper struct {
	Table *Table
	// Unforward removes a flow's forwarding from the kernel, if still()
	// holds when the kernel edit is made: a new connection from the same
	// client port may have been forwarded since the flow was found expired,
	// and its forwarding must stay.
	Unforward func(ctx context.Context, flow netip.AddrPort, still func() bool) error
	// Forwarded reads the kernel's forward map; Remove deletes a flow from
	// it, without failing if it is gone, if still() holds then. Nil: no
	// reconciliation.
	Forwarded func(ctx context.Context) (map[netip.AddrPort]netip.Addr, error)
	Remove    func(ctx context.Context, flow netip.AddrPort, still func() bool) error
	// Alive reports which flows carried packets within Idle (the kernel's
	// alive set); nil disables idle expiry.
	Alive     func(ctx context.Context) (func(netip.AddrPort) bool, error)
	Idle      time.Duration
	Tick      time.Duration // how often TIME_WAIT deadlines are checked
	IdleEvery time.Duration // how often the alive set is read
	Log       *slog.Logger
}

// ErrSkippedEdit is what Unforward and Remove return when their condition
// no longer held when the kernel edit was to be made.
var ErrSkippedEdit = errors.New("edit skipped: its condition no longer holds")

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
	now := time.Now()
	periodic := now.Sub(*lastIdle) >= r.IdleEvery
	if periodic {
		*lastIdle = now
		if r.Forwarded != nil {
			r.reconcile(ctx)
		}
	}
	if r.Table.Len() == 0 {
		return
	}
	var alive func(netip.AddrPort) bool
	if r.Alive != nil && periodic {
		a, err := r.Alive(ctx)
		if err != nil {
			r.Log.Warn("read alive flows", "op", "expire", "err", err)
		} else {
			alive = a
		}
	}
	for _, e := range r.Table.Expired(now, r.Idle, alive) {
		still := func() bool { return r.Table.Unchanged(e.Flow, e.State, e.Since) }
		err := r.Unforward(ctx, e.Flow, still)
		switch {
		case errors.Is(err, ErrSkippedEdit):
			// A new connection took the port over: its row and its
			// forwarding stay.
			continue
		case err != nil:
			// The entry goes anyway: a forward element that cannot be
			// deleted is missing already (the reconciliation removes a
			// leftover), and keeping the entry would retry forever.
			r.Log.Warn("unforward", "op", "expire", "client", e.Flow.String(), "err", err)
		}
		r.Table.ExpireIf(e.Flow, e.State, e.Since)
		r.Log.Debug("forwarding ended", "op", "expire", "client", e.Flow.String())
	}
}

// reconcile drops rows the kernel no longer forwards and removes
// forwarding nobody tracks.
func (r *Reaper) reconcile(ctx context.Context) {
	snapshot := time.Now()
	kernel, err := r.Forwarded(ctx)
	if err != nil {
		r.Log.Warn("read forwarded flows", "op", "reconcile", "err", err)
		return
	}
	dropped, orphans := r.Table.Reconcile(kernel, snapshot)
	for _, k := range orphans {
		still := func() bool { return r.Table.Absent(k) }
		if err := r.Remove(ctx, k, still); err != nil && !errors.Is(err, ErrSkippedEdit) {
			r.Log.Warn("remove untracked forwarding", "op", "reconcile", "client", k.String(), "err", err)
		}
	}
	if len(dropped)+len(orphans) > 0 {
		r.Log.Info("connection table reconciled with the kernel", "op", "reconcile",
			"stale_rows", len(dropped), "untracked_flows", len(orphans))
	}
}
