package conntab

import (
	"net/netip"
	"sort"
	"time"
)

// Unheld lists the connections be no longer has: rows HANDOFFED to be
// since before asked (when the FE asked be which flows it holds) whose flow
// held does not contain. A BE whose agent crashed, or that reset a client
// itself, answers the client directly: the FE never sees that connection's
// FIN or RST, and its row would stay (and count toward be's live
// connections) until idle expiry.
//
// Only rows older than the question are judged: a row handed off later may
// have been rebuilt on be after be listed its flows. For an older row the
// BE rebuilt the socket before its ack, so before the question, and lists
// it if it still has it. A row that changes after the decision (a move to
// another BE, a new connection on the port) is a new instance, which
// CloseIf leaves alone.
func (t *Table) Unheld(be netip.Addr, asked time.Time, held func(netip.AddrPort) bool) []ExpiredRow {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []ExpiredRow
	for k, c := range t.m {
		if c.State == Handoffed && c.BE == be && c.Since.Before(asked) && !held(k) {
			out = append(out, ExpiredRow{k, c.State, c.Since})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Flow.Compare(out[j].Flow) < 0 })
	return out
}

// CloseIf moves flow's row to TIME_WAIT until until, as a RST seen by the
// packet path would, if it is still the HANDOFFED instance since; it
// reports whether it did. The reaper then ends the forwarding.
func (t *Table) CloseIf(flow netip.AddrPort, since Instance, now, until time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.tracked(flow)()
	c, ok := t.m[flow]
	if !ok || c.State != Handoffed || !c.Since.Equal(since) {
		return false
	}
	c, _, err := t.apply(flow, EvRST, now)
	if err != nil || c == nil {
		return false
	}
	c.Until = until
	return true
}
