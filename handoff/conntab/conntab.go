// Package conntab is the FE's connection table, the seed's hash table of
// handed-off connections (seed 4.8.1; /proc/net/tcpha_fe_conn), with the
// per-connection state machine:
//
//	(new) --Begin--> HANDOFFING --Handed--> HANDOFFED --Closing--> TIME_WAIT
//	                     |                       |                    |
//	                   Failed                  idle                expired
//	                     v                       v                    v
//	                  (removed)              (removed)            (removed)
//
// It is pure: the kernel's sets follow it through the agent.
package conntab

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"sync"
	"time"
)

// State is a connection's state on the FE.
type State uint8

const (
	Handoffing State = iota + 1 // packets dropped while the connection moves
	Handoffed                   // packets forwarded to the BE in the kernel
	TimeWait                    // FIN or RST seen; forwarding kept a while
)

func (s State) String() string {
	switch s {
	case Handoffing:
		return "HANDOFFING"
	case Handoffed:
		return "HANDOFFED"
	case TimeWait:
		return "TIME_WAIT"
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// Conn is one connection's entry.
type Conn struct {
	Client  netip.AddrPort
	State   State
	BE      netip.Addr    // valid from HANDOFFED on
	Started time.Time     // when the handoff began
	Since   time.Time     // when State was entered
	Latency time.Duration // from Begin to Handed
	// Forwarded says the kernel's forward map holds this flow. It outlives
	// a connection that is replaced by a new one from the same client port.
	Forwarded bool
}

// ErrIllegal is returned for an event the connection's state does not allow.
var ErrIllegal = errors.New("illegal transition")

// Table holds the connections by client flow. It is safe for concurrent use.
type Table struct {
	mu sync.Mutex
	m  map[netip.AddrPort]*Conn
}

// New returns an empty table.
func New() *Table { return &Table{m: map[netip.AddrPort]*Conn{}} }

// Begin starts a handoff for flow. A flow still HANDOFFED or in TIME_WAIT
// is a client that reused its port: the new connection takes the entry over,
// and the stale forwarding is replaced when the new one is handed off.
func (t *Table) Begin(flow netip.AddrPort, now time.Time) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	old, ok := t.m[flow]
	if ok && old.State == Handoffing {
		return fmt.Errorf("begin %v: %w: handoff already in progress", flow, ErrIllegal)
	}
	t.m[flow] = &Conn{Client: flow, State: Handoffing, Started: now, Since: now, Forwarded: ok && old.Forwarded}
	return nil
}

// Handed records that be acknowledged the handoff. It reports whether a
// stale forward entry for the flow must be replaced.
func (t *Table) Handed(flow netip.AddrPort, be netip.Addr, now time.Time) (replace bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.m[flow]
	if !ok || c.State != Handoffing {
		return false, t.illegal("handed", flow, c)
	}
	replace = c.Forwarded
	c.State, c.BE, c.Since, c.Latency, c.Forwarded = Handoffed, be, now, now.Sub(c.Started), true
	return replace, nil
}

// Failed ends a handoff that did not happen; the FE serves the connection.
// It reports whether a stale forward entry of an earlier connection remains
// and must be removed.
func (t *Table) Failed(flow netip.AddrPort) (stale bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.m[flow]
	if !ok || c.State != Handoffing {
		return false, t.illegal("fail", flow, c)
	}
	delete(t.m, flow)
	return c.Forwarded, nil
}

// Closing records a FIN or RST on a HANDOFFED flow (seed 4.8.1 step 3).
// Flows in other states are left alone: TIME_WAIT keeps its first deadline.
func (t *Table) Closing(flow netip.AddrPort, now time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.m[flow]
	if !ok || c.State != Handoffed {
		return false
	}
	c.State, c.Since = TimeWait, now
	return true
}

// Expired lists the flows whose forwarding should end now: TIME_WAIT older
// than timeWait, and HANDOFFED flows older than idle that alive does not
// report as recently active.
func (t *Table) Expired(now time.Time, timeWait, idle time.Duration, alive func(netip.AddrPort) bool) []netip.AddrPort {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []netip.AddrPort
	for k, c := range t.m {
		switch {
		case c.State == TimeWait && now.Sub(c.Since) >= timeWait:
			out = append(out, k)
		case c.State == Handoffed && now.Sub(c.Since) >= idle && alive != nil && !alive(k):
			out = append(out, k)
		}
	}
	sortFlows(out)
	return out
}

// Remove forgets flow after its forwarding was removed.
func (t *Table) Remove(flow netip.AddrPort) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.m, flow)
}

// Adopt records a forwarding entry found in the kernel, for an agent that
// restarts and takes over its predecessor's flows.
func (t *Table) Adopt(flow netip.AddrPort, be netip.Addr, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.m[flow]; !ok {
		t.m[flow] = &Conn{Client: flow, State: Handoffed, BE: be, Started: now, Since: now, Forwarded: true}
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

// Len returns the number of entries.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}

func (t *Table) illegal(ev string, flow netip.AddrPort, c *Conn) error {
	if c == nil {
		return fmt.Errorf("%s %v: %w: no such connection", ev, flow, ErrIllegal)
	}
	return fmt.Errorf("%s %v: %w from %v", ev, flow, ErrIllegal, c.State)
}

func sortFlows(l []netip.AddrPort) {
	sort.Slice(l, func(i, j int) bool { return l[i].Compare(l[j]) < 0 })
}
