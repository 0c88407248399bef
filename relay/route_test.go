package relay

import (
	"slices"
	"testing"
)

// Decide never gives a request to a BE the rules do not name for it: this
// BE serves it only when a matching rule names it and it takes
// connections; otherwise the named BEs' web servers, or 503.
func TestDecide(t *testing.T) {
	be1, be2 := &Pool{}, &Pool{} // other BEs' web servers; nil is this BE's
	for _, tc := range []struct {
		name  string
		rules Rules
		want  Plan
	}{
		{"this BE's", Rules{Here: true, Usable: []*Pool{be1}}, Plan{Here: true}},
		{"another BE's: move there, or fetch from it", Rules{Usable: []*Pool{be1}, Named: []*Pool{be1}},
			Plan{Move: true, Pools: []*Pool{be1}}},
		{"several BEs, in the scheduler's order", Rules{Usable: []*Pool{be2, be1}},
			Plan{Move: true, Pools: []*Pool{be2, be1}}},
		{"this BE named by a later matching rule: the fallback", Rules{Usable: []*Pool{be1, nil}},
			Plan{Move: true, Pools: []*Pool{be1, nil}}},
		// Issue 19: be1's agent stopped while its web server runs; its
		// content must not be served by this BE.
		{"the named BE out: its web server, not this BE", Rules{Named: []*Pool{be1}},
			Plan{Pools: []*Pool{be1}}},
		{"every named BE out, in rule order", Rules{Named: []*Pool{be2, be1}},
			Plan{Pools: []*Pool{be2, be1}}},
		{"this BE named but taking no connections: not eligible", Rules{Named: []*Pool{nil, be1}},
			Plan{Pools: []*Pool{be1}}},
		{"only this BE named, and not eligible: 503", Rules{Named: []*Pool{nil}}, Plan{}},
		{"no BE named (no rule, or the FE's local rule): 503", Rules{}, Plan{}},
	} {
		// Pools compare as pointers: which web server, not what it holds.
		if got := Decide(tc.rules); got.Here != tc.want.Here || got.Move != tc.want.Move || !slices.Equal(got.Pools, tc.want.Pools) {
			t.Errorf("%s: got %+v, want %+v", tc.name, got, tc.want)
		}
	}
}
