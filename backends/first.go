package backends

import (
	"math"
	"net/netip"
	"slices"
)

// With [fe] accept = be the FE's packet path places a new connection on a
// BE by the slot hash (weights and health only), and that BE reads the
// first request. What each rule's policy then decides, on that BE, from the
// FE's load view (the cluster frame's loads, refreshed every dtcinterval):
//   - rr: the placement is the weighted round; a request whose rule names
//     this BE is served here.
//   - wlc: served here when this BE, counted with its own live figure, is
//     among the least loaded per weight (within one connection, as the FE's
//     wlc); otherwise moved to the least loaded.
//   - lard: served by the BE the content is bound to, the same on every BE
//     (weighted rendezvous hashing of host and path over the rule's usable
//     BEs), unless that BE is overloaded by LARD's thresholds, when the
//     least loaded serves it.
// Under wlc a BE counts each connection it moves to another in its view of
// that BE until the next view, so that a stale view does not send every
// connection to the BE that looked idle at the last probe. lard does not:
// it binds by content, not by the least loaded, and its thresholds are
// for connections open at once, which a count of short connections moved
// over a whole dtcinterval would overstate (TestSchedulers' 600 requests
// spilled content to the other BE when lard counted them).

// SetLoads sets the BEs' loads to the FE's view (the cluster frame's
// loads, accept = be); a BE missing from loads keeps its figure.
func (s *Scheduler) SetLoads(loads map[netip.Addr]int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for a, n := range loads {
		if b := s.bes[a]; b != nil {
			b.active, b.others = n, n
		}
	}
}

// Load is a's connection count as this scheduler sees it (0 for a BE it
// does not know): what the FE publishes as its load view.
func (s *Scheduler) Load(a netip.Addr) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bes[a] == nil {
		return 0
	}
	return s.load(a)
}

// FirstHere decides, on BE here, which accepted a connection (accept =
// be), where its first request q is served: ok true when the first
// matching rule names here and its policy keeps q here, with to empty;
// ok true and to the BEs to move it to, best first, when the policy sends
// it elsewhere; ok false when the first matching rule does not name here
// (the caller routes q as a later request). hereLoad is here's own live
// connection count, fresher than the view's.
func (s *Scheduler) FirstHere(q Request, here netip.Addr, hereLoad int) (ok bool, to []netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var x *rule
	for _, r := range s.rules {
		if r.Matches(q) {
			x = r
			break
		}
	}
	if x == nil || x.Local || !slices.Contains(x.Targets, here) {
		return false, nil
	}
	if x.policy != WLC && x.policy != LARD {
		return true, nil
	}
	// The rule's usable BEs; here is one whatever its last frame said (the
	// FE placed the connection here, so it takes connections).
	var cands []netip.Addr
	for _, a := range x.Targets {
		if b := s.bes[a]; a == here || b != nil && b.usable() {
			if !slices.Contains(cands, a) {
				cands = append(cands, a)
			}
		}
	}
	if len(cands) < 2 || s.bes[here] == nil {
		return true, nil
	}
	hb := s.bes[here]
	saved := hb.active
	hb.active = hereLoad
	defer func() { hb.active = saved }()
	slices.SortStableFunc(cands, s.compareLoadFirst)
	least := cands[0]
	var choice netip.Addr
	switch x.policy {
	case WLC:
		if here == least || s.nearLeastFirst(here, least) {
			return true, nil
		}
		choice = least
	case LARD:
		choice = s.bound(q, cands)
		if s.overloadedFirst(choice, least) {
			choice = least
		}
		if choice == here {
			return true, nil
		}
	}
	if x.policy == WLC {
		s.bes[choice].active++ // counted until the next view
	}
	to = []netip.Addr{choice}
	for _, a := range cands {
		if a != choice && a != here {
			to = append(to, a)
		}
	}
	return true, to
}

// loadFirst is a's load in FirstHere: the view's figure (a BE's scheduler
// has no Live). Under s.mu.
func (s *Scheduler) loadFirst(a netip.Addr) int { return s.bes[a].active }

func (s *Scheduler) compareLoadFirst(a, b netip.Addr) int {
	wa, wb := max(s.bes[a].srv.Weight, 1), max(s.bes[b].srv.Weight, 1)
	la, lb := s.loadFirst(a)*wb, s.loadFirst(b)*wa
	switch {
	case la < lb:
		return -1
	case la > lb:
		return 1
	}
	return a.Compare(b) // the same order on every BE
}

// nearLeastFirst is nearLeast over the view.
func (s *Scheduler) nearLeastFirst(a, least netip.Addr) bool {
	wa, wl := max(s.bes[a].srv.Weight, 1), max(s.bes[least].srv.Weight, 1)
	return (s.loadFirst(a)-1)*wl <= s.loadFirst(least)*wa
}

// overloadedFirst is overloaded over the view.
func (s *Scheduler) overloadedFirst(bound, least netip.Addr) bool {
	lb := s.loadFirst(bound)
	return (lb > LARDHigh && s.loadFirst(least) < LARDLow) || lb >= 2*LARDHigh
}

// bound is the BE q's content is bound to among cands: the highest
// weighted rendezvous score of (BE, host and path), so that every BE
// binds it to the same one, and a BE leaving rebinds only its own content.
func (s *Scheduler) bound(q Request, cands []netip.Addr) netip.Addr {
	key := uint64(14695981039346656037)
	for _, c := range []byte(q.Host + " " + q.Path) {
		key = (key ^ uint64(c)) * 1099511628211
	}
	best, bestScore := cands[0], math.Inf(-1)
	for _, a := range cands {
		w := float64(max(s.bes[a].srv.Weight, 1))
		if score := -w / math.Log(unit(mix(addrSeed(a)^mix(key)))); score > bestScore || score == bestScore && a.Less(best) {
			best, bestScore = a, score
		}
	}
	return best
}
