package backends

import (
	"math"
	"net/netip"
	"slices"
)

// SlotCount is the number of placement slots: the FE's packet path hashes a
// new flow's client address and port to one of them (`jhash … mod
// SlotCount`) and sends it to the slot's BE.
//
// 4096 because the table's share of each BE is a sample of SlotCount draws:
// its standard error is sqrt(p(1-p)/SlotCount), 0.8 % of the traffic for two
// equal BEs, well under the skew the client ports themselves bring to a few
// thousand connections; a weight of 1 against 4095 still gets a slot on
// average. A slot change costs one element edit in the kernel's verdict
// map, and one BE's change edits only its own slots (below), so a larger
// table would make changes no cheaper; a power of two is not needed by
// weighted rendezvous hashing (Maglev wants a prime), and 4096 elements
// keep `nft list map` short enough to page through.
const SlotCount = 4096

// SlotBE is a BE that takes new connections, and its weight.
type SlotBE struct {
	Addr   netip.Addr
	Weight int
}

// SlotTable maps each slot to its BE; it is empty when no BE takes new
// connections.
type SlotTable []netip.Addr

// Slots fills the placement table with bes in proportion to their weights,
// by weighted rendezvous hashing (highest random weight; Thaler and
// Ravishankar 1998, with the logarithmic weighting of Schindelhauer and
// Schomaker, "Weighted distributed hash tables", SPAA 2005): each slot goes
// to the BE with the highest score -w / ln(h(BE, slot)), h uniform in (0,1).
// A BE's score for a slot depends on that BE alone, so:
//   - removing a BE moves only the slots it held, each to the BE that
//     scored second there;
//   - adding a BE moves only the slots it now wins, about w/(W+w) of them;
//   - changing a BE's weight moves slots only to it (raised) or from it
//     (lowered).
//
// Maglev (Eisenbud et al., NSDI 2016) balances a little more evenly but
// moves some slots between BEs that did not change; rendezvous moves none,
// and the FE's forwarding of pinned flows does not depend on it anyway.
// BEs with weight 0 or less get no slot; a BE listed twice counts once, with
// its last weight. The result depends only on the set of (address, weight)
// pairs, not on their order.
func Slots(bes []SlotBE) SlotTable {
	type cand struct {
		addr netip.Addr
		seed uint64
		w    float64
	}
	byAddr := map[netip.Addr]int{}
	for _, b := range bes {
		byAddr[b.Addr] = b.Weight
	}
	var cs []cand
	for a, w := range byAddr {
		if w > 0 && a.IsValid() {
			cs = append(cs, cand{addr: a, seed: addrSeed(a), w: float64(w)})
		}
	}
	if len(cs) == 0 {
		return SlotTable{}
	}
	// Ties (measure zero) go to the lower address, whatever the input order.
	slices.SortFunc(cs, func(x, y cand) int { return x.addr.Compare(y.addr) })
	t := make(SlotTable, SlotCount)
	for s := range t {
		best, bestScore := 0, math.Inf(-1)
		for i, c := range cs {
			// -w/ln(u) is positive and grows with u and w.
			if score := -c.w / math.Log(unit(mix(c.seed^uint64(s)*0x9e3779b97f4a7c15))); score > bestScore {
				best, bestScore = i, score
			}
		}
		t[s] = cs[best].addr
	}
	return t
}

// SlotChange is one slot whose BE changed; To is invalid when the new table
// is empty.
type SlotChange struct {
	Slot     uint32
	From, To netip.Addr
}

// Diff returns the slots whose BE differs from prev's, in slot order: the
// element edits that turn the kernel's slot map from prev into t. A slot
// missing on one side (an empty table) counts as changed.
func (t SlotTable) Diff(prev SlotTable) []SlotChange {
	var out []SlotChange
	for s := range max(len(t), len(prev)) {
		var from, to netip.Addr
		if s < len(prev) {
			from = prev[s]
		}
		if s < len(t) {
			to = t[s]
		}
		if from != to {
			out = append(out, SlotChange{Slot: uint32(s), From: from, To: to})
		}
	}
	return out
}

// Counts returns how many slots each BE holds.
func (t SlotTable) Counts() map[netip.Addr]int {
	n := map[netip.Addr]int{}
	for _, a := range t {
		n[a]++
	}
	return n
}

// addrSeed is FNV-1a over the address's 16-byte form: a fixed function, so
// that every FE (and every restart) computes the same table.
func addrSeed(a netip.Addr) uint64 {
	h := uint64(14695981039346656037)
	for _, b := range a.As16() {
		h = (h ^ uint64(b)) * 1099511628211
	}
	return mix(h)
}

// mix is SplitMix64's finalizer (Steele, Lea and Flood, OOPSLA 2014): every
// input bit flips each output bit with probability about 1/2.
func mix(z uint64) uint64 {
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return z ^ z>>31
}

// unit maps a hash to (0,1), never 0 or 1, so its logarithm is finite and
// negative.
func unit(h uint64) float64 { return (float64(h>>11) + 0.5) / (1 << 53) }
