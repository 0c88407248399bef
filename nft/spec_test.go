package nft

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

var (
	sampleFE = FEParams{VIP: netip.MustParseAddr("10.0.0.100"), Port: 80, FreshTimeout: time.Minute,
		TimeWait: 10 * time.Second, IdleTimeout: 15 * time.Minute, Size: 65536, QueueNum: 3, Queue: QueueCompat}
	// sampleTLS has a TLS port: its rules match both ports by @ports.
	sampleTLS = func() FEParams { p := sampleFE; p.TLSPort = 443; return p }()
	sampleBE  = BEParams{VIP: netip.MustParseAddr("10.0.0.100"), UAddr: netip.MustParseAddr("10.0.0.250")}
)

// batchBytes returns the netlink messages Apply sends for rs, one line each
// (message type and payload in hex), without a kernel.
func batchBytes(t *testing.T, rs *Ruleset) string {
	t.Helper()
	var b strings.Builder
	handle := uint64(0)
	c, err := nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
		var replies []netlink.Message
		for _, m := range req {
			fmt.Fprintf(&b, "%04x %x\n", uint16(m.Header.Type), m.Data)
			if m.Header.Flags&netlink.Echo == 0 {
				continue
			}
			// Like the kernel, echo a new rule back with its handle.
			data := append([]byte(nil), m.Data...)
			if m.Header.Type == netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWRULE) {
				handle++
				attr, _ := netlink.MarshalAttributes([]netlink.Attribute{
					{Type: unix.NFTA_RULE_HANDLE, Data: binary.BigEndian.AppendUint64(nil, handle)},
				})
				data = append(data, attr...)
			}
			replies = append(replies, netlink.Message{Header: m.Header, Data: data})
		}
		return replies, nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	if err := Apply(c, rs); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// The exact bytes of both tables are pinned: a change to a rule shows up
// here without root. Run with UPDATE_GOLDEN=1 after a deliberate change and
// check testdata/*.nft with the privileged test.
func TestNetlinkGolden(t *testing.T) {
	native := sampleFE
	native.Queue = QueueNative
	checkGolden(t, map[string]*Ruleset{"fe.netlink": FE(sampleFE), "fe-native-queue.netlink": FE(native), "fe-tls.netlink": FE(sampleTLS),
		"be.netlink": BE(sampleBE), "fe-place.netlink": FEPlace(sampleFE, samplePlace)})
}

// The FE's rule order is the state machine's precedence; pin it by comment.
func TestFERuleOrder(t *testing.T) {
	var got []string
	for _, r := range FE(sampleFE).Rules {
		got = append(got, string(r.UserData[2:len(r.UserData)-1]))
	}
	want := []string{"untrack the VIP", "SYN from a port still forwarded: local, mark fresh", "SYN: local", "fresh: local",
		"HANDOFFED first FIN/RST: forward, tell the agent", "HANDOFFED: forward to BE", "forwarded above, @alive full: drop"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("rule order:\n got %q\nwant %q", got, want)
	}
	for _, name := range []string{SetFresh, MapForward, SetClosing, SetAlive} {
		if FE(sampleFE).Set(name) == nil {
			t.Errorf("set %s missing", name)
		}
	}
}

// A set update from the packet path fails when its set is full, and a
// failed expression ends its rule. Forwarding must not depend on one: in
// every rule that copies a packet to its BE, only @closing's mark may come
// before the copy (its rule falls through to the plain forwarding rule),
// and every forwarded flow has a last rule that drops without updating
// anything, so no forwarded packet reaches the FE's stack (issue 19).
func TestFEForwardingSurvivesFullSets(t *testing.T) {
	rs := FE(sampleFE)
	var copies, backstop int
	for _, r := range rs.Rules {
		dupAt, updates := -1, map[string]int{}
		for i, e := range r.Exprs {
			switch e := e.(type) {
			case *expr.Dup:
				dupAt = i
			case *expr.Dynset:
				updates[e.SetName] = i
			}
		}
		name := ruleComment(r.UserData)
		if dupAt >= 0 {
			copies++
			for set, at := range updates {
				if at < dupAt && set != SetClosing {
					t.Errorf("rule %q: @%s is updated before the copy to the BE", name, set)
				}
			}
		}
		last := r.Exprs[len(r.Exprs)-1]
		if v, ok := last.(*expr.Verdict); ok && v.Kind == expr.VerdictDrop && dupAt < 0 && len(updates) == 0 {
			backstop++
		}
	}
	if copies != 2 || backstop != 1 {
		t.Errorf("%d rules copy to the BE (want 2), %d drop forwarded packets without an update (want 1)", copies, backstop)
	}
}

// checkGolden compares each ruleset's netlink batch with its golden file
// in testdata (UPDATE_GOLDEN=1 rewrites them).
func checkGolden(t *testing.T, golden map[string]*Ruleset) {
	t.Helper()
	for name, rs := range golden {
		got := batchBytes(t, rs)
		path := "testdata/" + name
		if os.Getenv("UPDATE_GOLDEN") != "" {
			os.WriteFile(path, []byte(got), 0o644)
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if got != string(want) {
			t.Errorf("%s: netlink batch changed:\n--- got\n%s--- want\n%s", name, got, want)
		}
	}
}
