// Package conntab is the connection table, the seed's hash table of
// handed-off connections (seed 4.8.1; /proc/net/tcpha_fe_conn), and the
// per-connection state machine that drives it (fsm.go). On the FE:
//
//	(none) --handoff-start--> HANDOFFING --handoff-acked--> HANDOFFED --FIN/RST--> TIME_WAIT
//	                              |                             |                     |
//	                       handoff-failed                   timer (idle)            timer
//	                              v                             v                     v
//	                           (none)                        (none)                (none)
//
// It is pure: the kernel's sets and maps follow it through the agent.
package conntab

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"sync"
	"time"
)

// State is a connection's state.
type State uint8

const (
	Closed      State = iota // no entry
	Handoffing               // packets dropped while the connection moves
	Handoffed                // packets forwarded to the new owner in the kernel
	TimeWait                 // FIN or RST seen; forwarding or delivery kept a while
	Established              // BE: the connection was rebuilt here and is served here
	WillHandoff              // BE: a request for another BE waits to move the connection
	numStates
)

func (s State) String() string {
	switch s {
	case Closed:
		return "CLOSED"
	case Handoffing:
		return "HANDOFFING"
	case Handoffed:
		return "HANDOFFED"
	case TimeWait:
		return "TIME_WAIT"
	case Established:
		return "ESTABLISHED"
	case WillHandoff:
		return "WILLHANDOFF"
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// Conn is one connection's entry.
type Conn struct {
	Client  netip.AddrPort
	State   State
	BE      netip.Addr    // valid from HANDOFFED on, or once offered to it
	Started time.Time     // when the handoff began
	Since   time.Time     // when State was entered
	Latency time.Duration // from handoff-start to handoff-acked
	Until   time.Time     // when TIME_WAIT ends
	// Forwarded says the kernel's forward map holds this flow. It outlives
	// a connection that is replaced by a new one from the same client port.
	Forwarded bool
	// aliveAt is when the kernel last showed the flow active (the
	// reaper's idle check).
	aliveAt time.Time
	// closeUntil is set when the flow's first FIN or RST reached the agent
	// while it was still HANDOFFING: between the kernel's switch to
	// forwarding and the table's, the packet path marks the flow closing
	// and queues that packet only once. The handoff's end then goes on to
	// TIME_WAIT, until this deadline.
	closeUntil time.Time
}

// Table holds one role's connections by client flow. It is safe for
// concurrent use.
type Table struct {
	role Role
	mu   sync.Mutex
	m    map[netip.AddrPort]*Conn
	// live counts the HANDOFFED rows per BE: the connections each BE
	// serves for this FE, a scheduler's load.
	live map[netip.Addr]int
}

// New returns an empty FE table.
func New() *Table { return NewRole(FE) }

// NewRole returns an empty table for role.
func NewRole(role Role) *Table {
	return &Table{role: role, m: map[netip.AddrPort]*Conn{}, live: map[netip.Addr]int{}}
}

// liveBE returns the BE flow's row counts toward, if it counts.
func (t *Table) liveBE(flow netip.AddrPort) (netip.Addr, bool) {
	if c, ok := t.m[flow]; ok && (c.State == Handoffed || c.State == Handoffing) && c.BE.IsValid() {
		return c.BE, true
	}
	return netip.Addr{}, false
}

// tracked notes what flow's row counts toward now and returns the function
// that, once the row has changed, moves the count. Under t.mu.
func (t *Table) tracked(flow netip.AddrPort) func() {
	before, was := t.liveBE(flow)
	return func() {
		after, is := t.liveBE(flow)
		if was == is && before == after {
			return
		}
		if was {
			if t.live[before]--; t.live[before] <= 0 {
				delete(t.live, before)
			}
		}
		if is {
			t.live[after]++
		}
	}
}

// Offering notes the BE a HANDOFFING flow is being offered to: from now
// on it counts toward that BE's live connections, so that a scheduler
// choosing while handoffs are in flight sees them.
func (t *Table) Offering(flow netip.AddrPort, be netip.Addr) {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.tracked(flow)()
	if c, ok := t.m[flow]; ok && c.State == Handoffing {
		c.BE = be
	}
}

// Live returns how many connections be has: HANDOFFED, or being offered
// to it.
func (t *Table) Live(be netip.Addr) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.live[be]
}

// apply runs ev on flow's entry (Closed if there is none) and returns the
// entry after the step, or nil if the step removed it.
func (t *Table) apply(flow netip.AddrPort, ev Event, now time.Time) (*Conn, Action, error) {
	c, ok := t.m[flow]
	from := Closed
	if ok {
		from = c.State
	}
	to, act, err := Step(t.role, from, ev)
	if err != nil {
		return c, act, fmt.Errorf("%v: %w", flow, err)
	}
	switch {
	case to == Closed:
		delete(t.m, flow)
		return nil, act, nil
	case !ok:
		c = &Conn{Client: flow}
		t.m[flow] = c
	}
	if to != from {
		c.State, c.Since = to, now
	}
	return c, act, nil
}

// Begin starts a handoff for flow. A flow still HANDOFFED or in TIME_WAIT
// is a client that reused its port: the new connection takes the entry
// over, and the stale forwarding is replaced when it is handed off.
func (t *Table) Begin(flow netip.AddrPort, now time.Time) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.tracked(flow)()
	c, _, err := t.apply(flow, EvHandoffStart, now)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	c.restart(now)
	return nil
}

// restart clears what a row knew of an earlier handoff.
func (c *Conn) restart(now time.Time) {
	c.Started, c.BE, c.Latency, c.Until, c.closeUntil = now, netip.Addr{}, 0, time.Time{}, time.Time{}
}

// ErrNotForwarded: a BE asked to move a connection this FE does not forward
// to it.
var ErrNotForwarded = errors.New("not a connection this FE forwards to that BE")

// BeginMove starts moving flow, which the FE forwards to from, to another
// BE (multi-handoff: from gave the connection back for a request of another
// BE's). Only the BE a connection is forwarded to may move it. On failure
// Handed(flow, from) puts it back; the forwarding never changed.
func (t *Table) BeginMove(flow netip.AddrPort, from netip.Addr, now time.Time) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.m[flow]
	if !ok || c.State != Handoffed || c.BE != from {
		return fmt.Errorf("move %v from %v: %w", flow, from, ErrNotForwarded)
	}
	defer t.tracked(flow)()
	if _, _, err := t.apply(flow, EvHandoffStart, now); err != nil {
		return fmt.Errorf("move: %w", err)
	}
	c.restart(now)
	return nil
}

// Handed records that be acknowledged the handoff. It reports whether a
// stale forward entry for the flow must be replaced.
func (t *Table) Handed(flow netip.AddrPort, be netip.Addr, now time.Time) (replace bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.tracked(flow)()
	c, _, err := t.apply(flow, EvHandoffAcked, now)
	if err != nil {
		return false, fmt.Errorf("handed: %w", err)
	}
	replace = c.Forwarded
	c.BE, c.Latency, c.Forwarded = be, now.Sub(c.Started), true
	if until := c.closeUntil; !until.IsZero() {
		c.closeUntil = time.Time{}
		if c, _, err = t.apply(flow, EvFIN, now); err != nil {
			return replace, fmt.Errorf("handed, closing: %w", err)
		}
		c.Until = until
	}
	return replace, nil
}

// Failed ends a handoff that did not happen; the FE serves the connection.
// It reports whether a stale forward entry of an earlier connection remains
// and must be removed.
func (t *Table) Failed(flow netip.AddrPort) (stale bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.tracked(flow)()
	if c, ok := t.m[flow]; ok {
		stale = c.Forwarded
	}
	if _, _, err := t.apply(flow, EvHandoffFailed, time.Time{}); err != nil {
		return false, fmt.Errorf("fail: %w", err)
	}
	return stale, nil
}

// Observe feeds a packet event from the packet path. A flow that enters
// TIME_WAIT stays there until until. It returns the state after the step
// and what the packet path does with the packet.
func (t *Table) Observe(flow netip.AddrPort, ev Event, now, until time.Time) (State, Action, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.tracked(flow)()
	from := Closed
	if c, ok := t.m[flow]; ok {
		from = c.State
	}
	c, act, err := t.apply(flow, ev, now)
	if err != nil || c == nil {
		return Closed, act, err
	}
	if c.State == TimeWait && from != TimeWait {
		c.Until = until
	}
	if t.role == FE && c.State == Handoffing && (ev == EvFIN || ev == EvRST) && c.closeUntil.IsZero() {
		c.closeUntil = until
	}
	return c.State, act, nil
}

// ExpiredRow is a row whose forwarding should end: its flow, and the
// state and instance it was found in.
type ExpiredRow struct {
	Flow  netip.AddrPort
	State State
	Since Instance
}

// Expired lists the TIME_WAIT flows whose deadline has passed.
func (t *Table) Expired(now time.Time) []ExpiredRow {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []ExpiredRow
	for k, c := range t.m {
		if c.State == TimeWait && !now.Before(c.Until) {
			out = append(out, ExpiredRow{k, c.State, c.Since})
		}
	}
	sortRows(out)
	return out
}

// IdleDue lists, up to max of them, the HANDOFFED flows not known to be
// active within idle: handed off, or last found alive, idle ago or more.
// The caller asks the kernel about each: a flow still in its alive set is
// marked with SeenAlive, one that is not has been idle for idle at least,
// since the alive mark outlives its flow's last packet by idle.
func (t *Table) IdleDue(now time.Time, idle time.Duration, max int) []ExpiredRow {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []ExpiredRow
	for k, c := range t.m {
		if c.State == Handoffed && now.Sub(later(c.Since, c.aliveAt)) >= idle {
			out = append(out, ExpiredRow{k, c.State, c.Since})
		}
	}
	sortRows(out)
	if len(out) > max {
		out = out[:max]
	}
	return out
}

// SeenAlive notes that flow's row, if still the instance given, was found
// active at now.
func (t *Table) SeenAlive(flow netip.AddrPort, state State, since Instance, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if c, ok := t.m[flow]; ok && c.State == state && c.Since.Equal(since) {
		c.aliveAt = now
	}
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func sortRows(l []ExpiredRow) {
	sort.Slice(l, func(i, j int) bool { return l[i].Flow.Compare(l[j].Flow) < 0 })
}

// Expire applies the timer event once flow's forwarding is gone.
func (t *Table) Expire(flow netip.AddrPort) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.tracked(flow)()
	_, _, err := t.apply(flow, EvTimer, time.Time{})
	return err
}

// Instance identifies a row's current state: the time it entered it. A new
// connection from the same client port replaces the row's state, and so its
// instance.
type Instance = time.Time

// Unchanged tells whether flow's row is still in state since the instance
// given: neither gone nor replaced by a new connection on the port.
func (t *Table) Unchanged(flow netip.AddrPort, state State, since Instance) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.m[flow]
	return ok && c.State == state && c.Since.Equal(since)
}

// Absent tells whether flow has no row.
func (t *Table) Absent(flow netip.AddrPort) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.m[flow]
	return !ok
}

// ExpireIf applies the timer event if flow's row is still the instance
// given; it reports whether it did.
func (t *Table) ExpireIf(flow netip.AddrPort, state State, since Instance) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.tracked(flow)()
	c, ok := t.m[flow]
	if !ok || c.State != state || !c.Since.Equal(since) {
		return false
	}
	_, _, err := t.apply(flow, EvTimer, time.Time{})
	return err == nil
}

// Adopt records a flow found in the kernel, for an agent that restarts and
// takes over its predecessor's forwarding. A flow the table has is kept.
func (t *Table) Adopt(flow netip.AddrPort, be netip.Addr, state State, now, until time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.tracked(flow)()
	if _, ok := t.m[flow]; !ok {
		t.m[flow] = &Conn{Client: flow, State: state, BE: be, Started: now, Since: now, Until: until, Forwarded: true}
	}
}

// Get returns a copy of flow's entry.
func (t *Table) Get(flow netip.AddrPort) (Conn, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.m[flow]
	if !ok {
		return Conn{}, false
	}
	return *c, true
}

// Snapshot returns copies of all entries ordered by client.
func (t *Table) Snapshot() []Conn {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]Conn, 0, len(t.m))
	for _, c := range t.m {
		out = append(out, *c)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Client.Compare(out[j].Client) < 0 })
	return out
}

// Count returns how many entries are in each state.
func (t *Table) Count() map[State]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := map[State]int{}
	for _, c := range t.m {
		n[c.State]++
	}
	return n
}

// Len returns the number of entries.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

func sortFlows(l []netip.AddrPort) {
	sort.Slice(l, func(i, j int) bool { return l[i].Compare(l[j]) < 0 })
}

// Reconcile compares the table with the kernel's forwarded flows (flow →
// BE), read starting at snapshot. It returns the rows of a forwarded state
// (HANDOFFED, TIME_WAIT) whose flow the read lacks, for the caller to
// confirm and drop with DropIf, and the flows the kernel forwards that
// have no row at all: orphans, for the caller to remove from the kernel.
// Rows that changed state after snapshot are left alone: the read may have
// missed their forwarding being installed. HANDOFFING rows are never
// touched. A read can also miss an element a concurrent transaction moved
// (see nft.Reader), hence the confirmation.
func (t *Table) Reconcile(kernel map[netip.AddrPort]netip.Addr, snapshot time.Time) (stale []ExpiredRow, orphans []netip.AddrPort) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, c := range t.m {
		if (c.State == Handoffed || c.State == TimeWait) && c.Since.Before(snapshot) {
			if _, ok := kernel[k]; !ok {
				stale = append(stale, ExpiredRow{k, c.State, c.Since})
			}
		}
	}
	for k := range kernel {
		if _, ok := t.m[k]; !ok {
			orphans = append(orphans, k)
		}
	}
	sortRows(stale)
	sortFlows(orphans)
	return stale, orphans
}

// DropIf removes flow's row if it is still the instance given, without a
// state transition: its forwarding is gone already. It reports whether it
// did.
func (t *Table) DropIf(flow netip.AddrPort, state State, since Instance) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.m[flow]
	if !ok || c.State != state || !c.Since.Equal(since) {
		return false
	}
	done := t.tracked(flow)
	delete(t.m, flow)
	done()
	return true
}
