package fe

import (
	"net"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"tcpha/config"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
)

// With accept = be the cluster frame carries the FE's load view, taken
// after a round of probes and unchanged until the next one; with accept =
// fe it carries none and encodes as before.
func TestClusterFrameLoads(t *testing.T) {
	f, _, _ := testFE(t, time.Second)
	decode := func() wire.Cluster {
		t.Helper()
		p, err := f.clusterFrame()
		if err != nil {
			t.Fatal(err)
		}
		var c wire.Cluster
		if err := c.UnmarshalBinary(p); err != nil {
			t.Fatal(err)
		}
		return c
	}
	if c := decode(); c.Loads != nil {
		t.Errorf("accept = fe: loads %v", c.Loads)
	}
	f.cfg.Accept = config.AcceptBE
	if c := decode(); !slices.Equal(c.Loads, []uint32{0, 0}) {
		t.Errorf("before any probe: loads %v, want zeros", c.Loads)
	}
	now := time.Now()
	f.sched.Probe(be1, true, 7, "", now)
	f.sched.Probe(be2, true, 3, "", now)
	if c := decode(); !slices.Equal(c.Loads, []uint32{0, 0}) {
		t.Errorf("before the round's view is taken: loads %v", c.Loads)
	}
	if !f.takeLoads() {
		t.Error("a new view is no change")
	}
	c := decode()
	if !slices.Equal(c.Loads, []uint32{7, 3}) || c.Servers[0].Addr != be1 {
		t.Errorf("loads %v for %v, want be1 7, be2 3", c.Loads, c.Servers)
	}
	if f.takeLoads() {
		t.Error("the same view again is a change (the frame would go out every round)")
	}
}

// With accept = be only a BE's answer to the cluster frame decides
// whether it takes placed connections: taken, yes; refused (it cannot
// listen on VIP:port), no; a frame lost on the way (here a session that
// ended) leaves it as it was. A lost frame used to take the BE's slots
// away, and the frame now goes out every dtcinterval.
func TestClusterAnswerDecidesAcceptance(t *testing.T) {
	f, _, _ := testFE(t, time.Second)
	f.cfg.Accept = config.AcceptBE
	f.place = newPlacer()
	var result atomic.Int32 // the BE's answer
	session := func() *ctl.Session {
		t.Helper()
		a, b := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			ctl.Accept(b, &ctl.Config{Log: f.log, Local: wire.Hello{Role: wire.RoleBE}, Handler: ctl.HandlerFunc(func(s *ctl.Session, fr wire.Frame) {
				s.Reply(fr, ctl.AckFrame(wire.Result(result.Load()), "cannot listen"))
			})}, nil)
		}()
		s, err := ctl.Dial(a, &ctl.Config{Log: f.log, Local: wire.Hello{Role: wire.RoleFE}})
		if err != nil {
			t.Fatal(err)
		}
		<-done
		t.Cleanup(s.Close)
		return s
	}
	p, err := f.clusterFrame()
	if err != nil {
		t.Fatal(err)
	}
	be := netip.AddrPortFrom(be1, 666)
	accepting := func() bool {
		f.place.mu.Lock()
		defer f.place.mu.Unlock()
		return f.place.accepting[be1]
	}
	s := session()
	result.Store(int32(wire.ResultOK))
	if f.sendCluster(t.Context(), be, s, p); !accepting() {
		t.Fatal("a BE that took the frame does not accept")
	}
	result.Store(int32(wire.ResultInvalid))
	if f.sendCluster(t.Context(), be, s, p); accepting() {
		t.Fatal("a BE that refused the frame accepts")
	}
	result.Store(int32(wire.ResultOK))
	f.sendCluster(t.Context(), be, s, p)
	s.Close()
	if f.sendCluster(t.Context(), be, s, p); !accepting() {
		t.Error("a frame lost on the way took the BE's slots")
	}
}
