package handoff

import (
	"context"
	"fmt"
	"net/netip"
	"slices"

	"tcpha/handoff/wire"
)

// maxHeldPages bounds one question: 1,024 pages of wire.MaxHeldFlows, four
// million connections, far above any BE's maxclients.
const maxHeldPages = 1024

// Held asks be which client flows it holds on this FE's VIP port, page by
// page. Each page is the BE's state when it answered, after the question
// was sent: a flow missing from the answer was gone then. Any failure
// returns an error and no list, never a partial one.
func (c *Client) Held(ctx context.Context, be netip.AddrPort) (map[netip.AddrPort]bool, error) {
	held := map[netip.AddrPort]bool{}
	var after netip.AddrPort
	for range maxHeldPages {
		p, err := wire.HeldAsk{After: after}.MarshalBinary()
		if err != nil {
			return nil, fmt.Errorf("ask %v what it holds: %w", be, err)
		}
		s, err := c.Pool.Get(be, nil)
		if err != nil {
			return nil, fmt.Errorf("ask %v what it holds: %w", be, err)
		}
		r, err := s.Call(ctx, wire.Frame{Type: wire.TypeHeld, Payload: p})
		if err != nil {
			return nil, fmt.Errorf("ask %v what it holds: %w", be, err)
		}
		if r.Type == wire.TypeAck {
			var ack wire.Ack
			if err := ack.UnmarshalBinary(r.Payload); err != nil {
				return nil, fmt.Errorf("ask %v what it holds: %w", be, err)
			}
			return nil, fmt.Errorf("ask %v what it holds: %v: %s", be, ack.Result, ack.Reason)
		}
		if r.Type != wire.TypeHeldList {
			return nil, fmt.Errorf("ask %v what it holds: got %s, want held-list", be, r.Type)
		}
		var l wire.HeldList
		if err := l.UnmarshalBinary(r.Payload); err != nil {
			return nil, fmt.Errorf("ask %v what it holds: %w", be, err)
		}
		if len(l.Flows) > 0 && after.IsValid() && l.Flows[0].Compare(after) <= 0 {
			return nil, fmt.Errorf("ask %v what it holds: %w: page starts at %v, asked after %v", be, wire.ErrFormat, l.Flows[0], after)
		}
		for _, f := range l.Flows {
			held[f] = true
		}
		if !l.More {
			return held, nil
		}
		after = l.Flows[len(l.Flows)-1]
	}
	return nil, fmt.Errorf("ask %v what it holds: more than %d pages", be, maxHeldPages)
}

// HeldPage is the BE's answer to a held question: the flows of held (sorted
// ascending) after ask.After, at most wire.MaxHeldFlows of them.
func HeldPage(held []netip.AddrPort, ask wire.HeldAsk) wire.HeldList {
	i, found := slices.BinarySearchFunc(held, ask.After, netip.AddrPort.Compare)
	if found {
		i++
	}
	rest := held[i:]
	if len(rest) > wire.MaxHeldFlows {
		return wire.HeldList{More: true, Flows: rest[:wire.MaxHeldFlows]}
	}
	return wire.HeldList{Flows: rest}
}
