// Package backends knows the BEs an FE schedules to: which rule picks which
// BE for a request (seed 4.5) and which BEs are available (seed 4.9).
package backends

import (
	"net/netip"
	"sync"
	"time"
)

// Target is where a request goes: a BE's handoff listener, or the FE's
// local node.
type Target struct {
	Local bool
	BE    netip.AddrPort
}

func (t Target) String() string {
	if t.Local {
		return "local"
	}
	return t.BE.String()
}

// Scheduler picks targets by rule.
type Scheduler struct {
	rules   []Rule
	servers map[netip.Addr]Server
	health  *Health
}

// NewScheduler schedules over rules and servers, skipping BEs health marks
// down.
func NewScheduler(rules []Rule, servers []Server, health *Health) *Scheduler {
	m := make(map[netip.Addr]Server, len(servers))
	for _, s := range servers {
		m[s.Addr] = s
	}
	return &Scheduler{rules: rules, servers: m, health: health}
}

// Candidates returns the targets for a request path in the order to try
// them: the target of every matching rule, first match in file order first,
// each once, without BEs that are down. The first is the seed's choice; the
// rest are where the FE turns when a BE refuses or fails (the seed's rule
// list "must contain all the cases", so a catch-all usually follows).
func (s *Scheduler) Candidates(path string) []Target {
	var out []Target
	seen := map[Target]bool{}
	for _, r := range s.rules {
		if !r.Pattern.MatchString(path) {
			continue
		}
		t := Target{Local: true}
		if !r.Local {
			srv := s.servers[r.Target]
			if !s.health.Up(srv.Addr) {
				continue
			}
			t = Target{BE: srv.AddrPort()}
		}
		if !seen[t] {
			seen[t] = true
			out = append(out, t)
		}
	}
	return out
}

// Route is what the FE does with a request: try BEs in order and, if none
// takes the connection, serve it on the local node when Local is set.
// When the local node is the first choice, BEs is empty.
type Route struct {
	BEs   []netip.AddrPort
	Local bool
}

// Route turns Candidates into the FE's plan for path.
func (s *Scheduler) Route(path string) Route {
	var r Route
	for _, t := range s.Candidates(path) {
		switch {
		case !t.Local:
			r.BEs = append(r.BEs, t.BE)
		case len(r.BEs) == 0:
			return Route{Local: true} // the first choice is the local node
		default:
			r.Local = true // a fallback after the BEs
		}
	}
	return r
}

// Health records which BEs are available. A BE is up until marked down.
type Health struct {
	mu   sync.Mutex
	down map[netip.Addr]time.Time
}

// NewHealth returns a Health with every BE up.
func NewHealth() *Health { return &Health{down: map[netip.Addr]time.Time{}} }

// Up tells whether be may be scheduled.
func (h *Health) Up(be netip.Addr) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, down := h.down[be]
	return !down
}

// Set marks be up or down at time now and reports whether that changed
// anything.
func (h *Health) Set(be netip.Addr, up bool, now time.Time) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, wasDown := h.down[be]
	if up {
		delete(h.down, be)
		return wasDown
	}
	if !wasDown {
		h.down[be] = now
	}
	return !wasDown
}

// DownSince returns when be was marked down, and whether it is.
func (h *Health) DownSince(be netip.Addr) (time.Time, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	t, ok := h.down[be]
	return t, ok
}
