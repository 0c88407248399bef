package nft

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables/expr"
)

var (
	be11, be12  = netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	samplePlace = Placement{
		BEs: []netip.Addr{be11, be12}, Slots: []netip.Addr{be11, be12, be11, be11},
		Modulus: 4, Seed: 0x7c9a, PinTimeout: 10 * time.Second,
	}
)

func ruleComments(rs *Ruleset, chain string) []string {
	var out []string
	for _, r := range rs.Rules {
		if r.Chain.Name == chain {
			out = append(out, ruleComment(r.UserData))
		}
	}
	return out
}

func hasVerdict(e []expr.Any) bool {
	for _, x := range e {
		switch x := x.(type) {
		case *expr.Verdict:
			return true
		case *expr.Lookup:
			if x.IsDestRegSet && x.DestRegister == 0 {
				return true // a verdict map
			}
		}
	}
	return false
}

// The rule order is the placement's precedence; pin it by comment.
func TestFEPlaceRuleOrder(t *testing.T) {
	rs := FEPlace(sampleFE, samplePlace)
	want := map[string]string{
		"prerouting": "untrack the VIP|pinned: to its BE's chain|" +
			"pinned to a BE without a chain: forward|not pinned: place by hash|no BE for the slot: the FE answers",
		PinnedChain(be12): "SYN again: pin for pintimeout|closing: keep for timewait|first FIN/RST: keep for timewait|requested: keep for idletimeout|first request: keep for idletimeout|" +
			"no request yet: keep for pintimeout|forward",
		PlaceChain(be12): "SYN: forward, pin|SYN forwarded above, @forward full: not pinned|not pinned: forward by hash",
	}
	for chain, w := range want {
		if got := strings.Join(ruleComments(rs, chain), "|"); got != w {
			t.Errorf("chain %s:\n got %s\nwant %s", chain, got, w)
		}
	}
	if len(rs.Chains) != 1+2*len(samplePlace.BEs) || len(rs.Init[MapSlots]) != 4 || len(rs.Init[MapBEs]) != 2 {
		t.Errorf("%d chains, %d slot elements, %d BE elements", len(rs.Chains), len(rs.Init[MapSlots]), len(rs.Init[MapBEs]))
	}
	// An empty slot table installs no slot: rule 6 drops.
	empty := samplePlace
	empty.Slots = nil
	if n := len(FEPlace(sampleFE, empty).Init[MapSlots]); n != 0 {
		t.Errorf("%d slot elements for an empty table", n)
	}
}

// A set add or update from the packet path fails when its set is full, and
// a failed expression ends its rule. In every chain, a packet must be
// copied to its BE exactly once whether or not its updates succeed: a rule
// that copies before it updates is followed by a rule that drops without
// copying (the backstop), and a rule that updates before it copies, or
// updates without a verdict, is followed by a rule with a verdict that
// copies (rules without one fall through). And every
// chain ends in a drop or a verdict map, so nothing reaches the FE's stack.
func TestFEPlaceSurvivesFullSets(t *testing.T) {
	rs := FEPlace(sampleFE, samplePlace)
	for _, c := range rs.Chains {
		var rules [][]expr.Any
		var names []string
		for _, r := range rs.Rules {
			if r.Chain == c {
				rules, names = append(rules, r.Exprs), append(names, ruleComment(r.UserData))
			}
		}
		copies := func(e []expr.Any) bool {
			for _, x := range e {
				if _, ok := x.(*expr.Dup); ok {
					return true
				}
			}
			return false
		}
		for i, e := range rules {
			dupAt, setAt := -1, -1
			for j, x := range e {
				switch x := x.(type) {
				case *expr.Dup:
					if dupAt < 0 {
						dupAt = j
					}
				case *expr.Dynset:
					if x.SetName == MapForward && setAt < 0 {
						setAt = j
					}
				}
			}
			switch {
			case setAt < 0:
			case dupAt >= 0 && dupAt < setAt:
				if i+1 == len(rules) || copies(rules[i+1]) {
					t.Errorf("%s: %q copies before it pins, and the next rule copies again (or there is none)", c.Name, names[i])
				}
			default:
				// Rules without a verdict fall through to the next.
				next := i + 1
				for next < len(rules) && !hasVerdict(rules[next]) {
					next++
				}
				if next == len(rules) || !copies(rules[next]) {
					t.Errorf("%s: %q pins before it copies, and the next rule with a verdict does not copy", c.Name, names[i])
				}
			}
		}
		last := rules[len(rules)-1]
		if c.Name == "prerouting" && names[len(names)-1] == "no BE for the slot: the FE answers" {
			// The one way to the FE's stack: when no BE takes new
			// connections, its frontend answers 503.
			continue
		}
		switch v := last[len(last)-1].(type) {
		case *expr.Verdict:
			if v.Kind != expr.VerdictDrop {
				t.Errorf("%s ends in %v", c.Name, v.Kind)
			}
		default:
			t.Errorf("%s does not end in a drop", c.Name)
		}
	}
}

// SlotOf is the kernel's jhash; TestFEPlaceSYNs checks it against the
// kernel for 400 flows. Pinned here so that it runs without root.
func TestSlotOf(t *testing.T) {
	for flow, want := range map[string]uint32{"10.9.0.2:20000": 848, "192.168.1.7:54321": 3360} {
		if got := SlotOf(netip.MustParseAddrPort(flow), 4096, 0x5eed); got != want {
			t.Errorf("SlotOf(%s) = %d, want %d", flow, got, want)
		}
	}
}
