package nft

import (
	"net/netip"
	"testing"

	"tcpha/internal/privtest"
)

// A closing mark left without its forwarding (issue 19) must not outlive
// the next connection's handoff on the port: the packet path queues a
// HANDOFFED flow's first FIN or RST only when the flow is not in @closing,
// so a stale mark would hide the new connection's end and leave its row
// HANDOFFED until idletimeout. Forward clears the mark even when it has no
// earlier forwarding to replace.
func TestForwardClearsStaleClosing(t *testing.T) {
	eachRemoval(t, func(t *testing.T, ns string, fd int, m removal) {
		_, f, ctx := startFlows(t, fd, m)
		k := netip.MustParseAddrPort("10.0.0.10:40000")
		privtest.In(t, ns, "nft", "add", "element", "ip", "tcpha", "closing", "{ 10.0.0.10 . 40000 }")
		if m, err := NewReader(conn(t, fd), f.rs).Members(SetClosing); err != nil || len(m) != 1 {
			t.Fatalf("the stale mark was not set: %v %v", m, err)
		}
		if err := f.Forward(ctx, k, netip.MustParseAddr("10.0.0.11"), false); err != nil {
			t.Fatal(err)
		}
		if m, err := NewReader(conn(t, fd), f.rs).Members(SetClosing); err != nil || len(m) != 0 {
			t.Errorf("closing after a new connection's forwarding: %v %v", m, err)
		}
	})
}
