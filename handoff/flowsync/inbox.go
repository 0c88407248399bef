package flowsync

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"tcpha/handoff/wire"
)

// Inbox is the receiving side's view of the resync protocol: it remembers
// which flows the resync under way named, so that at its end the flows
// the peer no longer has are dropped. An FE that comes back after a crash
// adopts its own kernel's flows, some long ended; the active peer's resync
// is what removes them.
type Inbox struct {
	resyncing bool
	named     map[netip.AddrPort]struct{}
}

// ErrNoBegin is a resync page or end without its begin: the receiver
// missed part of the resync (it restarted, say) and refuses, so that the
// sender starts over.
var ErrNoBegin = errors.New("sync: resync page without its begin")

// Take checks batch b against the resync under way and notes the flows it
// names. done says b ended a resync: once b's events are applied, Stale
// names the flows to drop. One goroutine owns an Inbox (the session's
// batches are applied one at a time).
func (in *Inbox) Take(b wire.SyncBatch) (done bool, err error) {
	if b.Flags&wire.SyncBegin != 0 {
		in.resyncing, in.named = true, map[netip.AddrPort]struct{}{}
	} else if b.Flags&wire.SyncEnd != 0 && !in.resyncing {
		return false, ErrNoBegin
	}
	if in.resyncing {
		for _, e := range b.Events {
			if e.Kind != wire.SyncRemove {
				in.named[e.Flow] = struct{}{}
			}
		}
	}
	return b.Flags&wire.SyncEnd != 0, nil
}

// Stale returns the flows of have that the resync just ended did not name,
// and closes the resync.
func (in *Inbox) Stale(have []netip.AddrPort) []netip.AddrPort {
	var out []netip.AddrPort
	for _, f := range have {
		if _, ok := in.named[f]; !ok {
			out = append(out, f)
		}
	}
	in.resyncing, in.named = false, nil
	return out
}

// Have is what the receiving FE holds of a flow: its connection table's
// row.
type Have struct {
	Ok       bool
	BE       netip.Addr
	TimeWait bool
}

// Kernel is what a step does to the receiver's forward map.
type Kernel uint8

const (
	KernelNone    Kernel = iota
	KernelForward        // add or replace the flow's element (to Step.BE)
	KernelRemove         // remove the flow's element and marks, if there
)

// TableOp is what a step does to the receiver's connection table.
type TableOp uint8

const (
	TableNone      TableOp = iota
	TableHandoffed         // the row becomes HANDOFFED to Step.BE
	TableTimeWait          // the row becomes TIME_WAIT to Step.BE until Step.Until
	TableDrop              // the row goes
)

// Step is how the receiver applies one event: the kernel first, then the
// table, so that a row never claims a forwarding the kernel lacks.
type Step struct {
	Kernel Kernel
	Table  TableOp
	BE     netip.Addr
	Until  time.Time
}

func (s Step) String() string {
	return fmt.Sprintf("kernel %d table %d be %v until %v", s.Kernel, s.Table, s.BE, s.Until)
}

// Plan decides how event e changes a flow the receiver holds as have, at
// now. It touches the kernel only when the forwarding differs: a resync
// of a hundred thousand flows the standby already forwards costs no
// transaction.
func Plan(have Have, e wire.SyncEvent, now time.Time) Step {
	switch e.Kind {
	case wire.SyncForward:
		switch {
		case have.Ok && have.BE == e.BE && !have.TimeWait:
			return Step{}
		case have.Ok && have.BE == e.BE:
			// Back from TIME_WAIT: a new connection on the port to the
			// same BE; the element is there.
			return Step{Table: TableHandoffed, BE: e.BE}
		}
		return Step{Kernel: KernelForward, Table: TableHandoffed, BE: e.BE}
	case wire.SyncTimeWait:
		until := now.Add(e.Left)
		if have.Ok && have.BE == e.BE {
			return Step{Table: TableTimeWait, BE: e.BE, Until: until}
		}
		return Step{Kernel: KernelForward, Table: TableTimeWait, BE: e.BE, Until: until}
	case wire.SyncRemove:
		if !have.Ok {
			return Step{}
		}
		return Step{Kernel: KernelRemove, Table: TableDrop}
	}
	return Step{}
}
