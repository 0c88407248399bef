// Package backends knows the BEs an FE schedules to: which rule sends a
// request where (seed 4.5), which BEs are available (seed 4.9, with rise
// and fall counts), which registered themselves (seed 4.10), and how a rule
// naming several BEs picks one (round robin, weighted least connections,
// LARD). It is pure: the agent feeds it probe results, sessions and
// registrations, and asks it for routes.
package backends

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Route is what the FE does with a request: try BEs in order and, if none
// takes the connection, serve it on the local node when Local is set.
// When the local node is the first choice, BEs is empty.
type Route struct {
	BEs   []netip.AddrPort
	Local bool
}

// Options tune a Scheduler.
type Options struct {
	// Rise good probes in a row make a BE available again; Fall bad ones
	// make it unavailable. Zero means 2 and 3.
	Rise, Fall int
	// Live, if set, is this FE's count of a BE's open connections; a BE's
	// load is the larger of that and what its last probe reported.
	Live func(netip.Addr) int
	// Now is the clock of the BEs' state changes; nil: time.Now.
	Now func() time.Time
}

// LARD's thresholds, in connections (Pai et al.): a path moves off its BE
// when that BE's load is over High and another's is under Low, or when it
// reaches twice High.
const (
	LARDLow  = 25
	LARDHigh = 65
	// lardMax bounds the paths LARD remembers.
	lardMax = 1 << 16
)

// Scheduler routes requests by rule over the BEs' current state. The file
// table is swapped whole on reload; registrations come and go at run time.
// It is safe for concurrent use.
type Scheduler struct {
	opt  Options
	mu   sync.Mutex
	file Table
	regs []Registration
	// rules is the file's rules after the registered ones, compiled.
	rules []*rule
	bes   map[netip.Addr]*backend
	lard  map[string]netip.Addr
	// hits are the requests each rule routed, by ruleKey: kept across a
	// rebuild (a registration, a reload that keeps the rule).
	hits map[string]int64
}

type rule struct {
	Rule
	policy Policy
	swrr   map[netip.Addr]int // smooth weighted round robin's current weights
	key    string             // ruleKey
}

// ruleKey names a rule by what it says and where it is written, so that
// its hit count survives a rebuild that keeps it.
func ruleKey(r Rule) string {
	host, pat := "", ""
	if r.Host != nil {
		host = r.Host.String()
	}
	if r.Pattern != nil {
		pat = r.Pattern.String()
	}
	return fmt.Sprintf("%d %s %s host=%s %s", r.Line, r.TargetString(), r.Policy, host, pat)
}

// backend is one BE's state.
type backend struct {
	srv        Server
	registered bool
	session    bool // a control session is up
	healthy    bool // by probes: Fall bad in a row make it false, Rise good true
	good, bad  int
	draining   bool // an operator's drain: no new connections
	maint      bool // an operator's maint: forced down until ready
	active     int  // connections, by the last probe
	others     int  // of those, not this FE's (other FEs', say)
	handoffs   int64
	failures   int64
	lastProbe  time.Time
	lastErr    string
	// lastChange is when available() last changed (or the BE was added);
	// downtime the time it spent unavailable before downSince, the start
	// of its current down period (zero while available).
	lastChange, downSince time.Time
	downtime              time.Duration
}

// available: it may be scheduled. maint is forced down: no probe, no
// session brings it back, only ready.
func (b *backend) available() bool { return b.session && b.healthy && !b.maint }
func (b *backend) usable() bool    { return b.available() && !b.draining && b.srv.Weight > 0 }

// NewScheduler schedules by t.
func NewScheduler(t Table, opt Options) *Scheduler {
	if opt.Rise <= 0 {
		opt.Rise = 2
	}
	if opt.Fall <= 0 {
		opt.Fall = 3
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	s := &Scheduler{opt: opt, bes: map[netip.Addr]*backend{}, lard: map[string]netip.Addr{}, hits: map[string]int64{}}
	s.SetTable(t)
	return s
}

// SetTable swaps the file's table in whole (a reload): rules, servers,
// weights, the default policy. BEs that stay keep their state; their
// weights are the file's again. Registered BEs stay registered.
func (s *Scheduler) SetTable(t Table) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.file = t
	s.rebuild()
}

// SetRiseFall changes how many probes in a row change a BE's availability.
func (s *Scheduler) SetRiseFall(rise, fall int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.opt.Rise, s.opt.Fall = max(rise, 1), max(fall, 1)
}

// rebuild compiles the file table and the registrations. Under s.mu.
func (s *Scheduler) rebuild() {
	keep := map[netip.Addr]bool{}
	add := func(srv Server, registered bool) {
		keep[srv.Addr] = true
		b := s.bes[srv.Addr]
		if b == nil {
			// Down until its control session is up.
			now := s.opt.Now()
			b = &backend{healthy: true, lastChange: now, downSince: now}
			s.bes[srv.Addr] = b
		}
		b.srv, b.registered = srv, registered
	}
	for _, srv := range s.file.Servers {
		add(srv, false)
	}
	var rules []*rule
	// Registered BEs' rules come first: a file's rules usually end in a
	// catch-all, which would leave them nothing.
	for _, r := range s.regs {
		add(r.Server, true)
		for _, x := range r.Rules {
			rules = append(rules, s.compile(x))
		}
	}
	for _, x := range s.file.Rules {
		rules = append(rules, s.compile(x))
	}
	for a := range s.bes {
		if !keep[a] {
			delete(s.bes, a)
		}
	}
	kept := map[string]int64{}
	for _, x := range rules {
		kept[x.key] = s.hits[x.key]
	}
	s.hits = kept
	s.rules = rules
	clear(s.lard)
}

func (s *Scheduler) compile(r Rule) *rule {
	p := r.Policy
	if p == "" {
		p = s.file.Policy
	}
	if p == "" {
		p = RoundRobin
	}
	return &rule{Rule: r, policy: p, swrr: map[netip.Addr]int{}, key: ruleKey(r)}
}

// Servers lists every BE, configured and registered.
func (s *Scheduler) Servers() []Server {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Server, 0, len(s.bes))
	for _, b := range s.bes {
		out = append(out, b.srv)
	}
	slices.SortFunc(out, func(a, b Server) int { return a.Addr.Compare(b.Addr) })
	return out
}

// Registrations returns the registered BEs, in the order they came.
func (s *Scheduler) Registrations() []Registration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.regs)
}

// Effective returns the table the scheduler routes by: every BE with its
// current weight (an operator's weight included), the registered BEs'
// rules first, then the file's; the default policy. A BE that routes later
// requests itself gets it (multi-handoff, forwarding).
func (s *Scheduler) Effective() Table {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := Table{Policy: s.file.Policy}
	for _, b := range s.bes {
		t.Servers = append(t.Servers, b.srv)
	}
	slices.SortFunc(t.Servers, func(a, b Server) int { return a.Addr.Compare(b.Addr) })
	for _, x := range s.rules {
		t.Rules = append(t.Rules, x.Rule)
	}
	return t
}

// Holds tells whether a is a usable target of the first rule that matches
// path and has one: a BE holding a connection serves such a request itself,
// whichever of the rule's BEs a new connection would get.
func (s *Scheduler) Holds(q Request, a netip.Addr) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, x := range s.rules {
		if !x.Matches(q) {
			continue
		}
		if x.Local {
			return false
		}
		someone := false
		for _, t := range x.Targets {
			if b := s.bes[t]; b != nil && b.usable() {
				if t == a {
					return true
				}
				someone = true
			}
		}
		if someone {
			return false
		}
	}
	return false
}

// Named returns every BE the rules that match path name, in rule order,
// each once, whether it takes connections now or not, up to the first
// matching `local` rule (the FE's own server serves what comes to it). A
// BE holding a connection whose next request no usable BE takes fetches
// it from these BEs' web servers: never from one the rules do not name.
func (s *Scheduler) Named(q Request) []netip.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []netip.Addr
	for _, x := range s.rules {
		if !x.Matches(q) {
			continue
		}
		if x.Local {
			break
		}
		for _, t := range x.Targets {
			// A BE in maint is forced down, its web server included.
			if b := s.bes[t]; b != nil && b.maint {
				continue
			}
			if !slices.Contains(out, t) {
				out = append(out, t)
			}
		}
	}
	return out
}

// First returns the BEs the first rule that matches q names, whether they
// take connections now or not (nil when it is a `local` rule, or none
// matches): the rule that decides where q goes.
func (s *Scheduler) First(q Request) []netip.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, x := range s.rules {
		if x.Matches(q) {
			if x.Local {
				return nil
			}
			return slices.Clone(x.Targets)
		}
	}
	return nil
}

// Errors of the operator's and registrations' requests.
var (
	ErrUnknownBE  = errors.New("no such BE")
	ErrConfigured = errors.New("configured in the file")
)

// Register adds a BE that registered itself, or replaces its earlier
// registration. A BE the file configures cannot register.
func (s *Scheduler) Register(r Registration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, srv := range s.file.Servers {
		if srv.Addr == r.Server.Addr {
			return fmt.Errorf("register %v: %w", r.Server.Addr, ErrConfigured)
		}
	}
	for _, x := range r.Rules {
		if x.Local || len(x.Targets) != 1 || x.Targets[0] != r.Server.Addr {
			return fmt.Errorf("register %v: a rule names %s, not the BE itself", r.Server.Addr, x.TargetString())
		}
	}
	s.regs = slices.DeleteFunc(s.regs, func(x Registration) bool { return x.Server.Addr == r.Server.Addr })
	s.regs = append(s.regs, r)
	s.rebuild()
	return nil
}

// Deregister removes a registered BE and reports whether it was one.
func (s *Scheduler) Deregister(a netip.Addr) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.regs)
	s.regs = slices.DeleteFunc(s.regs, func(x Registration) bool { return x.Server.Addr == a })
	if len(s.regs) == n {
		return false
	}
	s.rebuild()
	return true
}

// Change is a BE's availability moving, for the caller to log once.
type Change struct {
	Changed   bool
	Available bool
}

func (s *Scheduler) change(a netip.Addr, f func(b *backend)) (Change, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.bes[a]
	if b == nil {
		return Change{}, fmt.Errorf("%v: %w", a, ErrUnknownBE)
	}
	before := b.available()
	f(b)
	now := b.available()
	if before != now {
		t := s.opt.Now()
		b.lastChange = t
		if now {
			b.downtime += t.Sub(b.downSince)
			b.downSince = time.Time{}
		} else {
			b.downSince = t
		}
	}
	return Change{Changed: before != now, Available: now}, nil
}

// Session records whether a's control sessions are up; without one it
// cannot take a handoff.
func (s *Scheduler) Session(a netip.Addr, up bool) (Change, error) {
	return s.change(a, func(b *backend) { b.session = up })
}

// Probe records one health probe of a: ok when it answered and its web
// server did, with its load. Fall failures in a row make it unavailable,
// Rise successes available again.
func (s *Scheduler) Probe(a netip.Addr, ok bool, active int, why string, now time.Time) (Change, error) {
	return s.change(a, func(b *backend) {
		b.lastProbe, b.lastErr = now, why
		if ok {
			b.active = active
			b.others = active
			if s.opt.Live != nil {
				b.others = max(0, active-s.opt.Live(a))
			}
			b.good, b.bad = b.good+1, 0
			if b.good >= s.opt.Rise {
				b.healthy = true
			}
			return
		}
		b.good, b.bad = 0, b.bad+1
		if b.bad >= s.opt.Fall {
			b.healthy = false
		}
	})
}

// SetDraining makes a take no new connections (drain), or take them again.
func (s *Scheduler) SetDraining(a netip.Addr, draining bool) error {
	_, err := s.change(a, func(b *backend) { b.draining = draining })
	return err
}

// SetMaint forces a down (maint: no new connections, open ones stay, and
// no probe brings it back), or lets probes and sessions decide again
// (ready). Unlike a drain it makes a unavailable: tcpha_backend_up is 0,
// its downtime runs, and a rule left without BEs falls through.
func (s *Scheduler) SetMaint(a netip.Addr, maint bool) (Change, error) {
	return s.change(a, func(b *backend) { b.maint = maint })
}

// ClearCounters zeroes what `tcphactl clear counters` clears: every BE's
// handoffs, failures and downtime (a BE down now counts from now) and the
// rules' hits.
func (s *Scheduler) ClearCounters() {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.opt.Now()
	for _, b := range s.bes {
		b.handoffs, b.failures, b.downtime = 0, 0, 0
		if !b.downSince.IsZero() {
			b.downSince = now
		}
	}
	for k := range s.hits {
		s.hits[k] = 0
	}
}

// RuleStatus is one rule as `tcphactl rules` shows it: registered BEs'
// first, then the file's, in the order they are tried.
type RuleStatus struct {
	Line       int    `json:"line"` // in the file; 0 for a registered BE's
	Targets    string `json:"targets"`
	Scheduler  string `json:"scheduler"`
	Host       string `json:"host"`
	Pattern    string `json:"pattern"`
	Registered bool   `json:"registered"`
	Hits       int64  `json:"hits"`
}

// Rules lists the running rules with the requests each routed.
func (s *Scheduler) Rules() []RuleStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]RuleStatus, 0, len(s.rules))
	nreg := 0
	for _, r := range s.regs {
		nreg += len(r.Rules)
	}
	for i, x := range s.rules {
		rs := RuleStatus{Line: x.Line, Targets: x.TargetString(), Scheduler: string(x.policy), Hits: s.hits[x.key],
			Registered: i < nreg}
		if x.Local {
			rs.Scheduler = ""
		}
		if x.Host != nil {
			rs.Host = x.Host.String()
		}
		if x.Pattern != nil {
			rs.Pattern = x.Pattern.String()
		}
		out = append(out, rs)
	}
	return out
}

// SetWeight changes a's weight until the next reload.
func (s *Scheduler) SetWeight(a netip.Addr, w int) error {
	if w < 0 || w > MaxWeight {
		return fmt.Errorf("weight %d: want 0 to %d", w, MaxWeight)
	}
	_, err := s.change(a, func(b *backend) { b.srv.Weight = w })
	return err
}

// Handed counts a handoff a took; Failed one it refused or failed.
func (s *Scheduler) Handed(a netip.Addr) { s.change(a, func(b *backend) { b.handoffs++ }) }

// Failed counts a handoff a refused or failed.
func (s *Scheduler) Failed(a netip.Addr) { s.change(a, func(b *backend) { b.failures++ }) }

// Placement returns the BEs that take new connections (available, not
// draining, weight above 0) with their weights, by address: the input of
// Slots for the FE's placement of new flows in the kernel.
func (s *Scheduler) Placement() []SlotBE {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []SlotBE
	for a, b := range s.bes {
		if b.usable() {
			out = append(out, SlotBE{Addr: a, Weight: b.srv.Weight})
		}
	}
	slices.SortFunc(out, func(x, y SlotBE) int { return x.Addr.Compare(y.Addr) })
	return out
}

// Available tells whether a may be scheduled (its sessions are up and its
// probes good), drained or not.
func (s *Scheduler) Available(a netip.Addr) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.bes[a]
	return b != nil && b.available()
}

// Status is one BE as `tcphactl backends` shows it.
type Status struct {
	Server     Server    `json:"-"`
	Addr       string    `json:"addr"`
	Port       uint16    `json:"port"`
	Weight     int       `json:"weight"`
	Available  bool      `json:"available"`
	Draining   bool      `json:"draining"`
	Maint      bool      `json:"maint"`
	Registered bool      `json:"registered"`
	Session    bool      `json:"session"`
	Active     int       `json:"active"`
	Live       int       `json:"live"`
	Handoffs   int64     `json:"handoffs"`
	Failures   int64     `json:"failures"`
	LastProbe  time.Time `json:"last_probe,omitzero"`
	LastError  string    `json:"last_error,omitempty"`
	// LastChange is when the BE last became available or unavailable;
	// Downtime the time it has been unavailable since it was added (or
	// the counters were cleared), its current down period included.
	LastChange time.Time `json:"last_change"`
	Downtime   float64   `json:"downtime_seconds"`
}

// Statuses returns every BE's state, by address.
func (s *Scheduler) Statuses() []Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Status, 0, len(s.bes))
	now := s.opt.Now()
	for a, b := range s.bes {
		down := b.downtime
		if !b.downSince.IsZero() {
			down += now.Sub(b.downSince)
		}
		st := Status{
			Server: b.srv, Addr: a.String(), Port: b.srv.Port, Weight: b.srv.Weight,
			Available: b.available(), Draining: b.draining, Maint: b.maint, Registered: b.registered, Session: b.session,
			Active: b.active, Handoffs: b.handoffs, Failures: b.failures, LastProbe: b.lastProbe, LastError: b.lastErr,
			LastChange: b.lastChange, Downtime: down.Seconds(),
		}
		if s.opt.Live != nil {
			st.Live = s.opt.Live(a)
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(x, y Status) int { return x.Server.Addr.Compare(y.Server.Addr) })
	return out
}

// Route returns the plan for a request for path: the BEs of every matching
// rule, first match first, each once, without BEs that are unavailable,
// drained or of weight 0 — a rule left with none falls through to the
// next. Within a rule its policy puts its choice first and the rest after,
// for the FE to turn to when a BE refuses. A local rule first makes the
// local node the choice; after BEs, the last resort.
func (s *Scheduler) Route(q Request) Route {
	s.mu.Lock()
	defer s.mu.Unlock()
	var r Route
	var seen map[netip.Addr]bool
	var cands []netip.Addr
	for _, x := range s.rules {
		if !x.Matches(q) {
			continue
		}
		if x.Local {
			if len(r.BEs) == 0 {
				s.hits[x.key]++
				return Route{Local: true}
			}
			r.Local = true
			continue
		}
		cands = cands[:0]
		for _, a := range x.Targets {
			if b := s.bes[a]; b != nil && b.usable() && !seen[a] {
				cands = append(cands, a)
			}
		}
		if len(cands) == 0 {
			continue
		}
		if len(cands) > 1 {
			s.order(x, cands, q)
		}
		if seen == nil {
			// The first rule that gives BEs is the one that routed it.
			s.hits[x.key]++
			seen = map[netip.Addr]bool{}
		}
		for _, a := range cands {
			seen[a] = true
			r.BEs = append(r.BEs, s.bes[a].srv.AddrPort())
		}
	}
	return r
}

// load is a's connection count: this FE's own, counted as they come and
// go, plus those the last probe found that are not this FE's (other FEs
// send it connections too). A probe's total alone is up to dtcinterval
// old: with short connections it would herd new ones onto whichever BE
// looked idle last. Under s.mu.
func (s *Scheduler) load(a netip.Addr) int {
	b := s.bes[a]
	if s.opt.Live == nil {
		return b.active
	}
	return s.opt.Live(a) + b.others
}

// order puts the rule's choice among cands first. Under s.mu.
func (s *Scheduler) order(x *rule, cands []netip.Addr, q Request) {
	switch x.policy {
	case WLC:
		s.byLoad(cands)
		// The least loaded per weight, and those within one connection of
		// it, share by weighted round robin. The slack is for connections
		// whose close has not reached this FE yet: a client's FIN races its
		// next connection, and without the slack the BE that served the
		// last one would lose every near tie, so that short connections
		// split evenly whatever the weights.
		n := 1
		for n < len(cands) && s.nearLeast(cands[n], cands[0]) {
			n++
		}
		s.pick(x, cands[:n])
	case LARD:
		s.byLoad(cands)
		// LARD binds content: the same path of two sites is two things.
		key := q.Host + " " + q.Path
		bound, ok := s.lard[key]
		i := slices.Index(cands, bound)
		least := cands[0]
		switch {
		case ok && i >= 0 && !s.overloaded(bound, least):
			// Keep the path where its cache is.
			cands[0], cands[i] = cands[i], cands[0]
		default:
			if len(s.lard) >= lardMax {
				for k := range s.lard {
					delete(s.lard, k)
					break
				}
			}
			n := 1
			for n < len(cands) && s.compareLoad(cands[0], cands[n]) == 0 {
				n++
			}
			s.pick(x, cands[:n])
			s.lard[key] = cands[0]
		}
	default:
		s.pick(x, cands)
	}
}

// overloaded tells whether LARD moves a path off bound, least being the
// least loaded candidate.
func (s *Scheduler) overloaded(bound, least netip.Addr) bool {
	lb := s.load(bound)
	return (lb > LARDHigh && s.load(least) < LARDLow) || lb >= 2*LARDHigh
}

// compareLoad orders a and b by load per weight.
func (s *Scheduler) compareLoad(a, b netip.Addr) int {
	wa, wb := s.bes[a].srv.Weight, s.bes[b].srv.Weight
	la, lb := s.load(a)*wb, s.load(b)*wa
	switch {
	case la < lb:
		return -1
	case la > lb:
		return 1
	}
	return 0
}

// nearLeast tells whether a, with one connection less, would be no more
// loaded per weight than least.
func (s *Scheduler) nearLeast(a, least netip.Addr) bool {
	return (s.load(a)-1)*s.bes[least].srv.Weight <= s.load(least)*s.bes[a].srv.Weight
}

func (s *Scheduler) byLoad(cands []netip.Addr) {
	slices.SortStableFunc(cands, s.compareLoad)
}

// pick moves the smooth weighted round robin's choice among cands to the
// front (nginx's algorithm: each turn every candidate's current weight
// grows by its weight, the largest is chosen and loses the total).
func (s *Scheduler) pick(x *rule, cands []netip.Addr) {
	if len(cands) < 2 {
		return
	}
	total, best := 0, 0
	for i, a := range cands {
		w := s.bes[a].srv.Weight
		total += w
		x.swrr[a] += w
		if x.swrr[a] > x.swrr[cands[best]] {
			best = i
		}
	}
	x.swrr[cands[best]] -= total
	cands[0], cands[best] = cands[best], cands[0]
}
