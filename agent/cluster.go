package agent

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"sync"
	"time"

	"tcpha/backends"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
	"tcpha/relay"
)

// The FE tells its BEs its rules and BE list (a cluster frame), so that a
// BE holding a keep-alive connection routes its later requests as the FE
// would (phttp = forward): the rules live in one place, the FE's config
// and registrations, and a reload or a registration reaches every BE.

// clusterRefresh is how often the FE sends the cluster frame without a
// change: a BE that restarted or was upgraded gets it again within this.
const clusterRefresh = 5 * time.Second

// kickCluster asks clusterLoop to send the cluster frame now.
func (f *fe) kickCluster() {
	select {
	case f.clusterKick <- struct{}{}:
	default:
	}
}

// clusterLoop sends the cluster frame to every BE on a change and every
// clusterRefresh.
func (f *fe) clusterLoop(ctx context.Context) {
	f.running.Store(true)
	f.kickCluster()
	t := time.NewTicker(clusterRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-f.clusterKick:
		}
		f.pushCluster(ctx)
	}
}

// phttpMode is the cluster frame's value of an [fe] phttp setting.
func phttpMode(s string) wire.PHTTP {
	switch s {
	case "forward":
		return wire.PHTTPForward
	case "multi":
		return wire.PHTTPMulti
	}
	return wire.PHTTPSingle
}

// clusterFrame is the FE's scheduling as BEs need it: every BE with its
// weight, 0 for one that takes no new connections now (unavailable,
// draining), and the rules in order.
func (f *fe) clusterFrame() ([]byte, error) {
	tab := f.sched.Effective()
	usable := map[netip.Addr]bool{}
	for _, st := range f.sched.Statuses() {
		usable[st.Server.Addr] = st.Available && !st.Draining
	}
	c := wire.Cluster{Policy: string(tab.Policy)}
	c.PHTTP = wire.PHTTP(f.phttp.Load())
	for _, srv := range tab.Servers {
		w := uint16(srv.Weight)
		if !usable[srv.Addr] {
			w = 0
		}
		c.Servers = append(c.Servers, wire.ClusterServer{Addr: srv.Addr, Port: srv.Port, Weight: w})
	}
	for _, r := range tab.Rules {
		cr := wire.ClusterRule{Targets: r.Targets, Local: r.Local, Policy: string(r.Policy), Pattern: r.PatternString()}
		if r.Host != nil {
			cr.Host = r.Host.String()
		}
		c.Rules = append(c.Rules, cr)
	}
	return c.MarshalBinary()
}

func (f *fe) pushCluster(ctx context.Context) {
	p, err := f.clusterFrame()
	if err != nil {
		f.log.Error("cluster frame", "op", "cluster", "err", err)
		return
	}
	var wg sync.WaitGroup
	for _, be := range f.pool.Peers() {
		s, err := f.pool.Get(be, nil)
		if err != nil {
			continue // it gets the frame once a session is up
		}
		wg.Go(func() { f.sendCluster(ctx, be, s, p) })
	}
	wg.Wait()
}

// sendCluster sends one BE the cluster frame p on session s.
func (f *fe) sendCluster(ctx context.Context, be netip.AddrPort, s *ctl.Session, p []byte) {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	r, err := s.Call(cctx, wire.Frame{Type: wire.TypeCluster, Payload: p})
	var ack wire.Ack
	if err == nil {
		if err = ack.UnmarshalBinary(r.Payload); err == nil && ack.Result != wire.ResultOK {
			err = fmt.Errorf("%v: %s", ack.Result, ack.Reason)
		}
	}
	if err != nil {
		f.log.Warn("cluster frame not taken", "op", "cluster", "be", be.String(), "err", err)
	}
}

// newSession asks a BE which connections it holds (held.go) and gives it
// the cluster frame on each new session, so that one
// that restarted or was upgraded routes like the FE from its first
// connection on (the pool's OnSession). Not while the FE starts: its first
// sessions come up one by one, and a frame sent then would tell a BE that
// the others, whose sessions are not up yet, take no connections, so the BE
// would keep their content for a moment. The sessions that came up meanwhile
// kicked clusterLoop, which sends the frame to all once the FE runs.
func (f *fe) newSession(be netip.AddrPort, s *ctl.Session) {
	// A new session may be to a BE that restarted: ask what it still holds.
	f.held.add(be)
	if !f.running.Load() {
		return
	}
	p, err := f.clusterFrame()
	if err != nil {
		f.log.Error("cluster frame", "op", "cluster", "err", err)
		return
	}
	go f.sendCluster(context.Background(), be, s, p)
}

// beCluster is what a BE knows of its cluster: the FE's last cluster frame,
// compiled.
type beCluster struct {
	raw   []byte
	phttp wire.PHTTP
	sched *backends.Scheduler
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
		rule := backends.Rule{Targets: r.Targets, Local: r.Local, Policy: backends.Policy(r.Policy), Line: i + 1}
		if r.Policy != "" {
			if _, err := backends.ParsePolicy(r.Policy); err != nil {
				return nil, err
			}
		}
		var err error
		if r.Pattern != "" {
			if rule.Pattern, err = regexp.Compile(r.Pattern); err != nil {
				return nil, fmt.Errorf("rule %d: %w", i+1, err)
			}
		}
		if r.Host != "" {
			if rule.Host, err = backends.CompileHost(r.Host); err != nil {
				return nil, fmt.Errorf("rule %d: host: %w", i+1, err)
			}
		}
		tab.Rules = append(tab.Rules, rule)
	}
	sched := backends.NewScheduler(tab, backends.Options{})
	for _, s := range tab.Servers {
		sched.Session(s.Addr, true)
	}
	return &beCluster{raw: bytes.Clone(p), phttp: c.PHTTP, sched: sched}, nil
}

// serveCluster takes an FE's cluster frame.
func (b *be) serveCluster(s *ctl.Session, f wire.Frame) {
	if old := b.cluster.Load(); old != nil && bytes.Equal(old.raw, f.Payload) {
		s.Reply(f, ctl.AckFrame(wire.ResultOK, "")) // the refresh of an unchanged one
		return
	}
	c, err := clusterOf(f.Payload)
	if err != nil {
		b.log.Warn("cluster frame refused", "op", "cluster", "peer", s.Remote.String(), "err", err)
		s.Reply(f, ctl.AckFrame(wire.ResultInvalid, err.Error()))
		return
	}
	if old := b.cluster.Swap(c); old == nil || !bytes.Equal(old.raw, c.raw) { // two FEs may race
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
func (b *be) route(host, path string) relay.Rules {
	q := backends.Request{Host: host, Path: path}
	c := b.cluster.Load()
	if c == nil || c.phttp == wire.PHTTPSingle {
		return relay.Rules{Here: true}
	}
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
func (b *be) poolOf(a netip.Addr) *relay.Pool {
	if a == b.cfg.RAddr {
		return nil
	}
	return b.webPool(a)
}

// webPool is the pool of keep-alive connections to another BE's web
// server, at its address and this BE's redirectport.
func (b *be) webPool(a netip.Addr) *relay.Pool {
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
	p := &relay.Pool{Dial: func(ctx context.Context) (*net.TCPConn, error) {
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
func (b *be) closeWeb() {
	b.webMu.Lock()
	defer b.webMu.Unlock()
	for _, p := range b.web {
		p.Close()
	}
	b.web = nil
}
