package nft

import (
	"net/netip"
	"testing"

	"tcpha/internal/privtest"
)

// A client that reused a port still forwarded for its earlier connection
// has its new flow marked fresh, which keeps the new connection's packets
// local. A successor's table must keep that mark, or from the takeover on
// those packets go to the earlier connection's BE.
func TestCarryOverFresh(t *testing.T) {
	eachRemoval(t, func(t *testing.T, ns string, fd int, m removal) {
		rs, f, ctx := startFlows(t, fd, m)
		reused := netip.MustParseAddrPort("10.0.0.10:1000")
		if err := f.Forward(ctx, reused, netip.MustParseAddr("10.0.0.11"), false); err != nil {
			t.Fatal(err)
		}
		// As the SYN rule marks it; and a mark of a port no longer forwarded,
		// which needs no carrying.
		privtest.In(t, ns, "nft", "add", "element", "ip", "tcpha", "fresh", "{ 10.0.0.10 . 1000, 10.0.0.10 . 2000 }")

		next := conn(t, fd)
		carried, err := ReadCarried(next, rs.Table)
		if err != nil {
			t.Fatal(err)
		}
		rs2 := FE(sampleFE)
		rs2.Init = carried.Init()
		if err := Apply(next, rs2); err != nil {
			t.Fatal(err)
		}
		fresh, err := NewReader(conn(t, fd), rs2).Members(SetFresh)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := fresh[reused]; !ok || len(fresh) != 1 {
			t.Errorf("fresh after the carry-over: %v, want only %v", fresh, reused)
		}
	})
}
