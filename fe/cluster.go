package fe

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"sync"
	"time"

	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
)

// The FE tells its BEs its rules and BE list (a cluster frame), so that a
// BE holding a keep-alive connection routes its later requests as the FE
// would (phttp = forward): the rules live in one place, the FE's config
// and registrations, and a reload or a registration reaches every BE.

// clusterRefresh is how often the FE sends the cluster frame without a
// change: a BE that restarted or was upgraded gets it again within this.
const clusterRefresh = 5 * time.Second

// kickCluster asks clusterLoop to send the cluster frame now.
func (f *FE) kickCluster() {
	select {
	case f.clusterKick <- struct{}{}:
	default:
	}
}

// clusterLoop sends the cluster frame to every BE on a change and every
// clusterRefresh.
func (f *FE) clusterLoop(ctx context.Context) {
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
func (f *FE) clusterFrame() ([]byte, error) {
	tab := f.sched.Effective()
	usable := map[netip.Addr]bool{}
	for _, st := range f.sched.Statuses() {
		usable[st.Server.Addr] = st.Available && !st.Draining
	}
	c := wire.Cluster{Policy: string(tab.Policy)}
	c.PHTTP = wire.PHTTP(f.phttp.Load())
	c.AcceptBE = f.acceptBE()
	var loads map[netip.Addr]uint32
	if c.AcceptBE {
		if p := f.loads.Load(); p != nil {
			loads = *p
		}
		c.Loads = []uint32{}
	}
	for _, srv := range tab.Servers {
		w := uint16(srv.Weight)
		if !usable[srv.Addr] {
			w = 0
		}
		c.Servers = append(c.Servers, wire.ClusterServer{Addr: srv.Addr, Port: srv.Port, Weight: w})
		if c.Loads != nil {
			c.Loads = append(c.Loads, loads[srv.Addr])
		}
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

// takeLoads takes the load view the cluster frame publishes (accept = be):
// each BE's connections as the FE's scheduler counts them, its own and
// what the BE's last probe reported. Taken once per round of probes, so
// the view changes at most every dtcinterval, and BEs that see the same
// view decide alike (backends.Scheduler.FirstHere). It reports whether the
// view changed.
func (f *FE) takeLoads() bool {
	m := map[netip.Addr]uint32{}
	for _, srv := range f.sched.Servers() {
		m[srv.Addr] = uint32(f.sched.Load(srv.Addr))
	}
	if old := f.loads.Load(); old != nil && maps.Equal(*old, m) {
		return false
	}
	f.loads.Store(&m)
	return true
}

func (f *FE) pushCluster(ctx context.Context) {
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
	if f.place != nil {
		f.updatePlacement(ctx)
	}
}

// sendCluster sends one BE the cluster frame p on session s.
func (f *FE) sendCluster(ctx context.Context, be netip.AddrPort, s *ctl.Session, p []byte) {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	r, err := s.Call(cctx, wire.Frame{Type: wire.TypeCluster, Payload: p})
	var ack wire.Ack
	answered := false
	if err == nil {
		if err = ack.UnmarshalBinary(r.Payload); err == nil {
			answered = true
			if ack.Result != wire.ResultOK {
				err = fmt.Errorf("%v: %s", ack.Result, ack.Reason)
			}
		}
	}
	if err != nil {
		f.log.Warn("cluster frame not taken", "op", "cluster", "be", be.String(), "err", err)
	}
	// With accept = be, a BE that took the frame listens on VIP:port:
	// only then may flows be placed on it, and one that refused it (it
	// cannot listen) loses its slots. A frame lost on the way (a timeout
	// on a busy machine, a session that ended) says neither: the BE keeps
	// what it had, and one that is gone loses its slots by its session
	// and probes. Since the frame goes out every dtcinterval with the
	// load view, a lost one must not flap the placement.
	if f.place != nil && answered && f.place.accepts(be.Addr(), err == nil) {
		f.kickCluster()
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
func (f *FE) newSession(be netip.AddrPort, s *ctl.Session) {
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
