// Package flowsync decides the flow-state sync between two FEs (issue 17,
// `[fe] syncpeer`): what the FE that holds the VIP sends its peer and when
// (Outbox: batching with a bounded lag, a full resync when the session
// (re)connects or the FE takes over), and what the peer does with it
// (Inbox and Plan: the resync protocol, and each event against the row it
// already has). It imports no kernel package; fe/sync.go wires it to the
// control sessions, the nft flow owner and the connection table.
package flowsync

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"time"

	"tcpha/handoff/wire"
)

// Defaults of an Outbox.
const (
	// DefaultLag is how long a change waits for others to share its
	// batch. With one batch in flight at a time (its ack comes once the
	// peer applied it, about a millisecond for a few hundred flows), a
	// change reaches the peer within about Lag plus one apply: the
	// issue's bound is 100 ms.
	DefaultLag = 50 * time.Millisecond
	// DefaultRetry is how long a failed send waits before the next try,
	// which starts a full resync over.
	DefaultRetry = time.Second
)

// Row is a flow's state as the peer should hold it.
type Row struct {
	BE netip.Addr
	// Until is when its TIME_WAIT ends; zero while HANDOFFED.
	Until time.Time
}

// Outbox is the sending side. It mirrors this FE's forwarded flows (every
// change is recorded, whether this FE is active or not, so that an FE that
// takes over can resync its peer with everything) and, while Active, sends
// the flows that changed. A flow that changes several times between two
// batches goes out once, in its latest state.
type Outbox struct {
	Lag, Retry time.Duration
	// Max bounds the events per batch (wire.MaxSyncEvents when 0).
	Max int
	// Ready, if set, tells whether a session to the peer is up: an
	// outbox that is not ready waits for Resync (the session's coming up)
	// instead of retrying.
	Ready func() bool
	Now   func() time.Time

	mu     sync.Mutex
	rows   map[netip.AddrPort]Row
	dirty  map[netip.AddrPort]struct{}
	order  []netip.AddrPort // the dirty flows, in the order they changed
	active bool
	// resync is set when the next batch starts a full resync; paging
	// holds the flows of the resync under way not sent yet.
	resync bool
	paging []netip.AddrPort
	inPage bool
	// since is when the oldest change not yet sent was recorded (zero
	// when none waits): the sync's lag.
	since time.Time
	wake  chan struct{}
	stats Stats
}

// Stats count what an Outbox sent.
type Stats struct {
	Batches, Events, Resyncs, Failures int64
	// Pending is how many flows wait to be sent; Lag is how long the
	// oldest change the peer has not acknowledged has waited, at most (0
	// when none waits).
	Pending int
	Lag     time.Duration
	// LastResync is when the last full resync started (zero: never).
	LastResync time.Time
	// LastErr is the last send's failure, if the one after it did not
	// succeed.
	LastErr string
}

// NewOutbox returns an empty, inactive outbox.
func NewOutbox() *Outbox {
	return &Outbox{rows: map[netip.AddrPort]Row{}, dirty: map[netip.AddrPort]struct{}{}, wake: make(chan struct{}, 1)}
}

func (o *Outbox) now() time.Time {
	if o.Now != nil {
		return o.Now()
	}
	return time.Now()
}

func (o *Outbox) max() int {
	if o.Max > 0 {
		return min(o.Max, wire.MaxSyncEvents)
	}
	return wire.MaxSyncEvents
}

// waiting notes that something waits to be sent from now, unless
// something older already does; o.mu is held.
func (o *Outbox) waiting() {
	if o.since.IsZero() {
		o.since = o.now()
	}
}

// drained notes that nothing waits to be sent any more, if so; o.mu is
// held.
func (o *Outbox) drained() {
	if !o.resync && !o.inPage && len(o.order) == 0 {
		o.since = time.Time{}
	}
}

// kick wakes Run; o.mu is held.
func (o *Outbox) kick() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// set records flow's new state (ok false: gone); o.mu is held.
func (o *Outbox) set(flow netip.AddrPort, r Row, ok bool) {
	if old, had := o.rows[flow]; had == ok && old == r {
		return // a FIN retransmitted, a forward re-applied: nothing new
	}
	if ok {
		o.rows[flow] = r
	} else {
		delete(o.rows, flow)
	}
	if !o.active {
		// Nothing is sent, and becoming active starts with a full
		// resync: a standby's changes are not kept (months of them would
		// pile up).
		return
	}
	if _, d := o.dirty[flow]; !d {
		o.dirty[flow] = struct{}{}
		o.order = append(o.order, flow)
	}
	o.waiting()
	if len(o.order) > len(o.rows)+o.max() && !o.inPage {
		// The peer has been unreachable for a while (every flow that
		// ended since waits to be removed): a full resync says it all in
		// fewer events, and the backlog stops growing.
		clear(o.dirty)
		o.order, o.resync = o.order[:0], true
	}
	o.kick()
}

// Forward records that flow is HANDOFFED to be (added, or replaced).
func (o *Outbox) Forward(flow netip.AddrPort, be netip.Addr) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.set(flow, Row{BE: be}, true)
}

// TimeWait records that flow entered TIME_WAIT, forwarded to be until
// until.
func (o *Outbox) TimeWait(flow netip.AddrPort, be netip.Addr, until time.Time) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.set(flow, Row{BE: be, Until: until}, true)
}

// Remove records that flow's forwarding ended.
func (o *Outbox) Remove(flow netip.AddrPort) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.set(flow, Row{}, false)
}

// Touch sends flow's state again with the next batch, unchanged: the
// peer's copy of an element that sees none of the flow's packets times
// out on its own ([fe] accept = be, whose forward map has idletimeout),
// and a sent flow is otherwise sent again only when it changes. A flow
// the outbox does not mirror is left alone.
func (o *Outbox) Touch(flow netip.AddrPort) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, ok := o.rows[flow]; !ok || !o.active {
		return
	}
	if _, d := o.dirty[flow]; !d {
		o.dirty[flow] = struct{}{}
		o.order = append(o.order, flow)
	}
	o.waiting()
	o.kick()
}

// Len is how many flows the outbox mirrors.
func (o *Outbox) Len() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.rows)
}

// Resync makes the next batch start a full resync: the session to the
// peer (re)connected, so the peer may have missed anything.
func (o *Outbox) Resync() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.resync = true
	if o.active {
		o.waiting()
	}
	o.kick()
}

// SetActive says whether this FE holds the VIP. Only an active outbox
// sends; one that becomes active starts with a full resync (its peer,
// the old master come back, holds flows that ended while it was away).
func (o *Outbox) SetActive(active bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if active && !o.active {
		o.resync = true
		o.waiting()
		o.kick()
	}
	if !active {
		clear(o.dirty)
		o.order, o.paging, o.inPage = nil, nil, false
		o.since = time.Time{}
	}
	o.active = active
}

// Active tells whether the outbox sends.
func (o *Outbox) Active() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.active
}

// Stats returns the outbox's counters.
func (o *Outbox) Stats() Stats {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.stats
	s.Pending = len(o.order) + len(o.paging)
	if !o.since.IsZero() {
		s.Lag = max(o.now().Sub(o.since), 0)
	}
	return s
}

// event is flow's current state as an event; o.mu is held.
func (o *Outbox) event(flow netip.AddrPort, now time.Time) wire.SyncEvent {
	r, ok := o.rows[flow]
	switch {
	case !ok:
		return wire.SyncEvent{Kind: wire.SyncRemove, Flow: flow}
	case r.Until.IsZero():
		return wire.SyncEvent{Kind: wire.SyncForward, Flow: flow, BE: r.BE}
	}
	left := min(max(r.Until.Sub(now), 0), wire.MaxSyncLeft).Truncate(time.Millisecond)
	return wire.SyncEvent{Kind: wire.SyncTimeWait, Flow: flow, BE: r.BE, Left: left}
}

// Next returns the next batch to send, if any: the pages of a full resync
// first, then the flows that changed, oldest change first.
func (o *Outbox) Next() (wire.SyncBatch, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.active {
		return wire.SyncBatch{}, false
	}
	now, max := o.now(), o.max()
	var b wire.SyncBatch
	if o.resync {
		// A snapshot of every flow; the changes recorded so far are in
		// it. Changes recorded while it pages go out after its end.
		o.resync, o.inPage = false, true
		o.paging = make([]netip.AddrPort, 0, len(o.rows))
		for f := range o.rows {
			o.paging = append(o.paging, f)
		}
		slices.SortFunc(o.paging, func(a, b netip.AddrPort) int { return a.Compare(b) })
		clear(o.dirty)
		o.order = o.order[:0]
		o.stats.Resyncs++
		o.stats.LastResync = now
		b.Flags |= wire.SyncBegin
	}
	if o.inPage {
		for len(o.paging) > 0 && len(b.Events) < max {
			f := o.paging[0]
			o.paging = o.paging[1:]
			if _, ok := o.rows[f]; ok { // gone since: the end drops it
				b.Events = append(b.Events, o.event(f, now))
			}
		}
		if len(o.paging) == 0 {
			o.inPage, o.paging = false, nil
			b.Flags |= wire.SyncEnd
		}
		return b, true
	}
	if len(o.order) == 0 {
		return b, false
	}
	n := min(len(o.order), max)
	for _, f := range o.order[:n] {
		delete(o.dirty, f)
		b.Events = append(b.Events, o.event(f, now))
	}
	o.order = slices.Delete(o.order, 0, n)
	return b, true
}

// failed records a batch that did not get through: the peer may have
// applied part of it, or nothing, so the next try is a full resync.
func (o *Outbox) failed(err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.resync, o.inPage, o.paging = true, false, nil
	o.stats.Failures++
	o.stats.LastErr = err.Error()
}

// sent records a batch the peer acknowledged. The lag restarts only once
// nothing waits: a change made while the batch was in flight keeps the
// older time, so Lag is an upper bound.
func (o *Outbox) sent(b wire.SyncBatch) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.stats.Batches++
	o.stats.Events += int64(len(b.Events))
	o.stats.LastErr = ""
	o.drained()
}

// full tells whether a batch should go without waiting for more.
func (o *Outbox) full() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.resync || o.inPage || len(o.order) >= o.max()
}

// Run sends batches with send, one at a time (each waits for the peer's
// ack), until ctx ends. A change waits up to Lag for others to join its
// batch; a failed send is retried after Retry as a full resync, or, when
// Ready says no session is up, when the next one comes up (Resync).
func (o *Outbox) Run(ctx context.Context, send func(context.Context, wire.SyncBatch) error) {
	lag, retry := o.Lag, o.Retry
	if lag <= 0 {
		lag = DefaultLag
	}
	if retry <= 0 {
		retry = DefaultRetry
	}
	// retryC is set while a failed send waits: changes do not hurry it.
	var retryC <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-retryC:
			retryC = nil
		case <-o.wake:
			if retryC != nil {
				continue
			}
		}
		if o.Ready != nil && !o.Ready() {
			continue
		}
		if !o.full() {
			select {
			case <-ctx.Done():
				return
			case <-time.After(lag):
			}
		}
		for {
			b, ok := o.Next()
			if !ok {
				break
			}
			if err := send(ctx, b); err != nil {
				o.failed(err)
				retryC = time.After(retry)
				break
			}
			o.sent(b)
		}
	}
}
