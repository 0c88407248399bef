package be

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"

	"tcpha/backends"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
	"tcpha/relay"
)

// beCluster is what a BE knows of its cluster: the FE's last cluster frame,
// compiled.
type beCluster struct {
	raw []byte
	// rules is raw without the FE's load view: a frame that differs from
	// the last only in its loads updates them in place (every dtcinterval
	// with accept = be) instead of recompiling the rules.
	rules []byte
	// loads is the frame's load view (nil: none), which the scheduler's
	// figures are reset to on each refresh.
	loads  map[netip.Addr]int
	phttp  wire.PHTTP
	accept bool // the FE's accept = be
	sched  *backends.Scheduler
	// fe is the hello of the FE that sent the frame: its VIP ports, which
	// direct moves from other BEs are checked against.
	fe wire.Hello
}

// clusterOf compiles a cluster frame's payload.
func clusterOf(p []byte) (*beCluster, error) {
	var c wire.Cluster
	if err := c.UnmarshalBinary(p); err != nil {
		return nil, err
	}
	tab := backends.Table{Policy: backends.Policy(c.Policy)}
	if tab.Policy != "" {
		if _, err := backends.ParsePolicy(c.Policy); err != nil {
			return nil, err
		}
	}
	for _, s := range c.Servers {
		tab.Servers = append(tab.Servers, backends.Server{Addr: s.Addr, Port: s.Port, Weight: int(s.Weight)})
	}
	for i, r := range c.Rules {
		rule, err := backends.CompileRule(r.Targets, r.Local, r.Policy, r.Host, r.Pattern)
		if err != nil {
			return nil, fmt.Errorf("rule %d: %w", i+1, err)
		}
		rule.Line = i + 1
		tab.Rules = append(tab.Rules, rule)
	}
	sched := backends.NewScheduler(tab, backends.Options{})
	for _, s := range tab.Servers {
		sched.Session(s.Addr, true)
	}
	loads := loadsOf(c)
	sched.SetLoads(loads)
	c.Loads = nil
	rules, err := c.MarshalBinary()
	if err != nil {
		return nil, err
	}
	return &beCluster{raw: bytes.Clone(p), rules: rules, loads: loads, phttp: c.PHTTP, accept: c.AcceptBE, sched: sched}, nil
}

// loadsOf is a cluster frame's load view by BE; nil without one.
func loadsOf(c wire.Cluster) map[netip.Addr]int {
	if c.Loads == nil {
		return nil
	}
	m := make(map[netip.Addr]int, len(c.Loads))
	for i, s := range c.Servers {
		m[s.Addr] = int(min(c.Loads[i], 1<<30))
	}
	return m
}

// serveCluster takes an FE's cluster frame.
func (b *BE) serveCluster(s *ctl.Session, f wire.Frame) {
	if old := b.cluster.Load(); old != nil && bytes.Equal(old.raw, f.Payload) {
		// The refresh of an unchanged one; with a load view (accept = be,
		// every dtcinterval) it resets what this BE counted since.
		if old.loads != nil {
			old.sched.SetLoads(old.loads)
		}
		s.Reply(f, ctl.AckFrame(wire.ResultOK, ""))
		return
	}
	c, err := clusterOf(f.Payload)
	if err != nil {
		b.log.Warn("cluster frame refused", "op", "cluster", "peer", s.Remote.String(), "err", err)
		s.Reply(f, ctl.AckFrame(wire.ResultInvalid, err.Error()))
		return
	}
	if old := b.cluster.Load(); old != nil && bytes.Equal(old.rules, c.rules) {
		// Only the load view changed: the scheduler keeps its rules and
		// round-robin state.
		old.sched.SetLoads(c.loads)
		c.sched, c.fe = old.sched, old.fe
		b.cluster.CompareAndSwap(old, c) // a frame with new rules may have come meanwhile
		s.Reply(f, ctl.AckFrame(wire.ResultOK, ""))
		return
	}
	c.fe = s.Peer
	if c.accept {
		if err := b.acceptOn(s.Peer.VIP); err != nil {
			b.log.Warn("cluster frame refused: cannot accept new connections", "op", "cluster", "peer", s.Remote.String(), "err", err)
			s.Reply(f, ctl.AckFrame(wire.ResultInvalid, err.Error()))
			return
		}
	}
	old := b.cluster.Swap(c)
	b.setPeers(c)
	if old == nil || !bytes.Equal(old.raw, c.raw) { // two FEs may race
		b.log.Info("cluster rules from the FE", "op", "cluster", "peer", s.Remote.String(), "phttp", c.phttp.String(),
			"servers", len(c.sched.Servers()))
	}
	s.Reply(f, ctl.AckFrame(wire.ResultOK, ""))
}

// route is the relay's view of the FE's rules for a later request
// (relay.Config.Route): whether the request is this BE's, the BEs that
// take connections now in the FE's order, and every BE the rules name;
// relay.Decide makes the plan (phttp = multi: move; forward, or a move
// that failed: fetch from those BEs' web servers; else 503). Without the
// FE's rules, or with phttp = single, every request is this BE's.
func (b *BE) route(host, path string) relay.Rules {
	c := b.cluster.Load()
	if c == nil || c.phttp == wire.PHTTPSingle {
		return relay.Rules{Here: true}
	}
	return b.routeIn(c, host, path)
}

// routeFirst routes the first request of a connection this BE accepted
// (accept = be), whatever phttp says.
func (b *BE) routeFirst(host, path string) relay.Rules {
	c := b.cluster.Load()
	if c == nil {
		return relay.Rules{Here: true}
	}
	// The FE placed the connection here, so this BE takes connections,
	// whatever its last cluster frame said of it (a BE that just came
	// back is named with weight 0 until the next frame): a request whose
	// rule names it is its own, unless the rule's wlc or lard sends it to
	// another of its BEs by the FE's load view (backends/first.go).
	return b.firstIn(c, host, path, b.relay.Active())
}

// firstIn is routeFirst under cluster c, this BE serving active client
// connections now.
func (b *BE) firstIn(c *beCluster, host, path string, active int) relay.Rules {
	ok, to := c.sched.FirstHere(backends.Request{Host: host, Path: path}, b.cfg.RAddr, active)
	switch {
	case ok && len(to) == 0:
		return relay.Rules{Here: true}
	case ok:
		r := relay.Rules{To: to}
		for _, a := range to {
			r.Usable = append(r.Usable, b.poolOf(a))
		}
		// A move that fails falls back to fetching from those BEs' web
		// servers, then to this BE's own (nil): the rule names it too.
		r.Usable = append(r.Usable, nil)
		return r
	}
	return b.routeIn(c, host, path)
}

func (b *BE) routeIn(c *beCluster, host, path string) relay.Rules {
	q := backends.Request{Host: host, Path: path}
	if c.sched.Holds(q, b.cfg.RAddr) {
		return relay.Rules{Here: true}
	}
	var r relay.Rules
	for _, be := range c.sched.Route(q).BEs {
		r.Usable = append(r.Usable, b.poolOf(be.Addr()))
	}
	if len(r.Usable) > 0 {
		return r // Named serves only when no BE named takes connections
	}
	for _, a := range c.sched.Named(q) {
		r.Named = append(r.Named, b.poolOf(a))
	}
	return r
}

// poolOf is the pool of connections to a's web server: nil for this BE's
// own.
func (b *BE) poolOf(a netip.Addr) *relay.Pool {
	if a == b.cfg.RAddr {
		return nil
	}
	return b.webPool(a)
}

// webPool is the pool of keep-alive connections to another BE's web
// server, at its address and this BE's redirectport.
func (b *BE) webPool(a netip.Addr) *relay.Pool {
	b.webMu.Lock()
	defer b.webMu.Unlock()
	if p := b.web[a]; p != nil {
		return p
	}
	if b.web == nil {
		b.web = map[netip.Addr]*relay.Pool{}
	}
	addr := netip.AddrPortFrom(a, b.cfg.RedirectPort)
	dial := ctl.Dialer(b.cfg.RAddr)
	p := &relay.Pool{Name: a.String(), Dial: func(ctx context.Context) (*net.TCPConn, error) {
		c, err := dial(ctx, addr)
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}}
	b.web[a] = p
	return p
}

// closeWeb closes the pools to other BEs' web servers.
func (b *BE) closeWeb() {
	b.webMu.Lock()
	defer b.webMu.Unlock()
	for _, p := range b.web {
		p.Close()
	}
	b.web = nil
}
