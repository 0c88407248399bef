package backends_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"tcpha/backends"
)

func beAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}) }

func slotBEs(weights ...int) []backends.SlotBE {
	out := make([]backends.SlotBE, len(weights))
	for i, w := range weights {
		out[i] = backends.SlotBE{Addr: beAddr(11 + i), Weight: w}
	}
	return out
}

// Each BE's share of the slots is its share of the weight, within 2.5
// percentage points (about three standard errors of a 4096-slot sample,
// sqrt(0.25/4096) = 0.78 %).
func TestSlotsProportions(t *testing.T) {
	for _, weights := range [][]int{{1, 1}, {3, 1}, {1, 1, 1, 0}, {1, 2, 3, 4}, {100, 1}, {5}} {
		t.Run(fmt.Sprint(weights), func(t *testing.T) {
			bes := slotBEs(weights...)
			tab := backends.Slots(bes)
			if len(tab) != backends.SlotCount {
				t.Fatalf("%d slots, want %d", len(tab), backends.SlotCount)
			}
			total := 0
			for _, w := range weights {
				total += w
			}
			counts := tab.Counts()
			for _, b := range bes {
				got := float64(counts[b.Addr]) / backends.SlotCount
				want := float64(b.Weight) / float64(total)
				if math.Abs(got-want) > 0.025 {
					t.Errorf("%v (weight %d) holds %.3f of the slots, want %.3f", b.Addr, b.Weight, got, want)
				}
				if b.Weight == 0 && counts[b.Addr] != 0 {
					t.Errorf("%v has weight 0 and %d slots", b.Addr, counts[b.Addr])
				}
			}
			t.Logf("counts %v", counts)
		})
	}
}

func TestSlotsEmpty(t *testing.T) {
	for name, bes := range map[string][]backends.SlotBE{
		"nil": nil, "all weight 0": slotBEs(0, 0), "invalid address": {{Weight: 3}},
	} {
		if tab := backends.Slots(bes); len(tab) != 0 {
			t.Errorf("%s: %d slots, want none", name, len(tab))
		}
	}
	// Losing every BE clears every slot; the first BE fills them all.
	full := backends.Slots(slotBEs(1))
	if d := backends.Slots(nil).Diff(full); len(d) != backends.SlotCount || d[0].To.IsValid() || d[0].From != beAddr(11) {
		t.Errorf("full to empty: %d changes, first %+v", len(d), d[0])
	}
	if d := full.Diff(nil); len(d) != backends.SlotCount || d[7] != (backends.SlotChange{Slot: 7, To: beAddr(11)}) {
		t.Errorf("empty to full: %d changes, slot 7 %+v", len(d), d[7])
	}
}

// The table depends on the set of BEs and weights only: not on the order
// they are listed in, nor on the run.
func TestSlotsDeterministic(t *testing.T) {
	bes := slotBEs(1, 2, 3, 4, 5, 6)
	want := backends.Slots(bes)
	for i := range 20 {
		shuffled := slices.Clone(bes)
		rand.New(rand.NewPCG(uint64(i), 1)).Shuffle(len(shuffled), func(a, b int) { shuffled[a], shuffled[b] = shuffled[b], shuffled[a] })
		if d := backends.Slots(shuffled).Diff(want); len(d) != 0 {
			t.Fatalf("order %v: %d slots differ", shuffled, len(d))
		}
	}
	// Pinned, so that a change to the hash (which would move every
	// placed flow's slot on an upgrade of one FE of several) is deliberate.
	got := fmt.Sprint(want[:4], want.Counts()[beAddr(11)])
	if golden := "[10.0.0.12 10.0.0.13 10.0.0.13 10.0.0.11] 225"; got != golden {
		t.Errorf("first slots and 10.0.0.11's count = %s, want %s", got, golden)
	}
}

// randomBEs returns between 2 and 12 BEs of weights 1..10.
func randomBEs(r *rand.Rand) []backends.SlotBE {
	bes := make([]backends.SlotBE, 2+r.IntN(11))
	for i := range bes {
		bes[i] = backends.SlotBE{Addr: beAddr(1 + r.IntN(4000)), Weight: 1 + r.IntN(10)}
	}
	return bes
}

// Removing a BE (it went NOTAVAILABLE, or was drained) moves exactly the
// slots it held and no other: rendezvous hashing's bound is exact.
func TestSlotsRemoveMovesOnlyItsSlots(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		bes := randomBEs(r)
		before := backends.Slots(bes)
		i := r.IntN(len(bes))
		gone := bes[i].Addr
		rest := slices.Delete(slices.Clone(bes), i, i+1)
		if slices.ContainsFunc(rest, func(b backends.SlotBE) bool { return b.Addr == gone }) {
			continue // drawn twice
		}
		d := backends.Slots(rest).Diff(before)
		for _, c := range d {
			if c.From != gone {
				t.Fatalf("removing %v moved slot %d from %v to %v", gone, c.Slot, c.From, c.To)
			}
		}
		if len(d) != before.Counts()[gone] {
			t.Fatalf("removing %v moved %d slots; it held %d", gone, len(d), before.Counts()[gone])
		}
	}
}

// Adding a BE of weight w to a total of W moves only slots to it, about
// w/(W+w) of them (within 2.5 points).
func TestSlotsAddMovesItsShare(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	worst := 0.0
	for range 200 {
		bes := randomBEs(r)
		before := backends.Slots(bes)
		added := backends.SlotBE{Addr: beAddr(5000 + r.IntN(1000)), Weight: 1 + r.IntN(10)}
		d := backends.Slots(append(slices.Clone(bes), added)).Diff(before)
		for _, c := range d {
			if c.To != added.Addr {
				t.Fatalf("adding %v moved slot %d from %v to %v", added.Addr, c.Slot, c.From, c.To)
			}
		}
		total := 0
		for _, w := range backends.Slots(bes).Counts() {
			total += w
		}
		weight := 0
		seen := map[netip.Addr]bool{}
		for _, b := range slices.Backward(bes) {
			if !seen[b.Addr] { // a duplicate counts once, with its last weight
				seen[b.Addr] = true
				weight += b.Weight
			}
		}
		want := float64(added.Weight) / float64(weight+added.Weight)
		got := float64(len(d)) / backends.SlotCount
		worst = max(worst, math.Abs(got-want))
		if math.Abs(got-want) > 0.025 {
			t.Errorf("adding weight %d to %d moved %.3f of the slots, want %.3f", added.Weight, weight, got, want)
		}
	}
	t.Logf("worst deviation from w/(W+w): %.4f", worst)
}

// Changing one BE's weight moves slots only to it (raised) or only from it
// (lowered).
func TestSlotsWeightChange(t *testing.T) {
	bes := slotBEs(2, 3, 5)
	before := backends.Slots(bes)
	for _, w := range []int{1, 4, 9} {
		changed := slices.Clone(bes)
		changed[1].Weight = w
		for _, c := range backends.Slots(changed).Diff(before) {
			if w > 3 && c.To != changed[1].Addr || w < 3 && c.From != changed[1].Addr {
				t.Errorf("weight 3 -> %d moved slot %d from %v to %v", w, c.Slot, c.From, c.To)
			}
		}
	}
}

// Placement hands Slots the BEs that take new connections: available, not
// draining, weight above 0.
func TestPlacement(t *testing.T) {
	s := newScheduler(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666 weight=3
server = 10.0.0.12 666
server = 10.0.0.13 666
server = 10.0.0.14 666 weight=0
rule = 10.0.0.11,10.0.0.12,10.0.0.13 .*
`, backends.Options{})
	if err := s.SetDraining(beAddr(12), true); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Session(beAddr(13), false); err != nil {
		t.Fatal(err)
	}
	got := s.Placement()
	if want := []backends.SlotBE{{Addr: beAddr(11), Weight: 3}}; !slices.Equal(got, want) {
		t.Errorf("Placement() = %v, want %v", got, want)
	}
}

// About 2.5 ms for ten BEs here (4096 x 10 logarithms, on two shared
// cores), once per change of a BE's state: far below dtcinterval.
func BenchmarkSlots(b *testing.B) {
	bes := slotBEs(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
	prev := backends.Slots(bes[1:])
	b.ReportAllocs()
	for b.Loop() {
		if len(backends.Slots(bes).Diff(prev)) == 0 {
			b.Fatal("no change")
		}
	}
}
