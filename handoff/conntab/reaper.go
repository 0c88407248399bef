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
//
// Its reads of the kernel must not wait behind, or hold up, the edits a
// handoff waits on: the agent gives it a netlink socket of its own. Idle
// expiry asks about one flow at a time, each HANDOFFED flow about once an
// Idle, instead of listing the whole alive set: a listing of 200k elements
// on the edits' socket once held a handoff's commit up for 6 s (issue 19).
type Reaper struct {
	Table *Table
	// Unforward removes a flow's forwarding from the kernel, if still()
	// holds when the kernel edit is made: a new connection from the same
	// client port may have been forwarded since the flow was found expired,
	// and its forwarding must stay.
	Unforward func(ctx context.Context, flow netip.AddrPort, still func() bool) error
	// Forwarded reads the kernel's forward map; it may miss elements, so
	// Forwarding confirms a flow missing from it. Remove deletes a flow
	// from it, without failing if it is gone, if still() holds then. Nil
	// Forwarded: no reconciliation.
	Forwarded  func(ctx context.Context) (map[netip.AddrPort]netip.Addr, error)
	Forwarding func(ctx context.Context, flow netip.AddrPort) (bool, error)
	Remove     func(ctx context.Context, flow netip.AddrPort, still func() bool) error
	// Alive tells whether flow carried a packet within Idle (the kernel's
	// alive set); nil disables idle expiry.
	Alive     func(ctx context.Context, flow netip.AddrPort) (bool, error)
	Idle      time.Duration
	Tick      time.Duration // how often deadlines are checked
	IdleEvery time.Duration // how often the forward map is reconciled
	Log       *slog.Logger
}

// maxIdleChecks bounds the kernel look-ups of one round, so that a burst of
// flows coming due together does not delay TIME_WAIT's ends: the rest wait
// for the next round. At ~20 µs a look-up, a round stays under ~100 ms.
const maxIdleChecks = 4096

// ErrSkippedEdit is what Unforward and Remove return when their condition
// no longer held when the kernel edit was to be made.
var ErrSkippedEdit = errors.New("edit skipped: its condition no longer holds")

// Run reaps until ctx is done.
func (r *Reaper) Run(ctx context.Context) {
	tick := time.NewTicker(r.Tick)
	defer tick.Stop()
	lastReconcile := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		r.Once(ctx, &lastReconcile)
	}
}

// Once does one round; lastReconcile is when the forward map was last
// reconciled.
func (r *Reaper) Once(ctx context.Context, lastReconcile *time.Time) {
	now := time.Now()
	if now.Sub(*lastReconcile) >= r.IdleEvery {
		*lastReconcile = now
		if r.Forwarded != nil {
			r.reconcile(ctx)
		}
	}
	if r.Table.Len() == 0 {
		return
	}
	expired := r.Table.Expired(now)
	if r.Alive != nil {
		for _, e := range r.Table.IdleDue(now, r.Idle, maxIdleChecks) {
			alive, err := r.Alive(ctx, e.Flow)
			switch {
			case err != nil:
				// Keep the flow: a failed look-up says nothing about it.
				r.Log.Warn("look up an idle flow", "op", "expire", "client", e.Flow.String(), "err", err)
				continue
			case alive:
				r.Table.SeenAlive(e.Flow, e.State, e.Since, now)
				continue
			}
			expired = append(expired, e)
		}
	}
	for _, e := range expired {
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
		r.Log.Debug("forwarding ended", "op", "expire", "client", e.Flow.String(), "state", e.State.String())
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
	stale, orphans := r.Table.Reconcile(kernel, snapshot)
	dropped := 0
	for _, e := range stale {
		// The listing may have missed it: only a look-up that does not
		// find it drops the row. A dropped row whose flow is still
		// forwarded would turn into an orphan, and its client be cut.
		if r.Forwarding != nil {
			if there, err := r.Forwarding(ctx, e.Flow); err != nil || there {
				continue
			}
		}
		if r.Table.DropIf(e.Flow, e.State, e.Since) {
			dropped++
		}
	}
	for _, k := range orphans {
		still := func() bool { return r.Table.Absent(k) }
		if err := r.Remove(ctx, k, still); err != nil && !errors.Is(err, ErrSkippedEdit) {
			r.Log.Warn("remove untracked forwarding", "op", "reconcile", "client", k.String(), "err", err)
		}
	}
	if dropped+len(orphans) > 0 {
		r.Log.Info("connection table reconciled with the kernel", "op", "reconcile",
			"stale_rows", dropped, "untracked_flows", len(orphans))
	}
}
