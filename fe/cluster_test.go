package fe

import (
	"slices"
	"testing"
	"time"

	"tcpha/config"
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
