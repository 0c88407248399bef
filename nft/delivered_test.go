package nft

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
)

var sampleDelivered = DeliveredParams{VIP: netip.MustParseAddr("10.0.0.100"), IdleTimeout: 15 * time.Minute,
	Size: 65536, QueueNum: 1, Queue: QueueCompat}

// The BE's delivered table, byte for byte, in both queue modes (see
// TestNetlinkGolden).
func TestDeliveredNetlinkGolden(t *testing.T) {
	native := sampleDelivered
	native.Queue = QueueNative
	checkGolden(t, map[string]*Ruleset{"be-delivered.netlink": Delivered(sampleDelivered),
		"be-delivered-native-queue.netlink": Delivered(native)})
}

// Every queue rule of the delivered table has the bypass flag: a dead
// agent must not stop the web server serving its connections
// (TestDeliverSocketOutlivesAgent).
func TestDeliveredQueueBypass(t *testing.T) {
	for _, mode := range []QueueMode{QueueNative, QueueCompat} {
		p := sampleDelivered
		p.Queue = mode
		n := 0
		for _, r := range Delivered(p).Rules {
			for _, e := range r.Exprs {
				switch e := e.(type) {
				case *expr.Queue:
					n++
					if e.Flag&expr.QueueFlagBypass == 0 {
						t.Errorf("%v: rule %q queues without bypass", mode, ruleComment(r.UserData))
					}
				case *expr.Target:
					n++
					// struct xt_NFQ_info_v3: flags at byte 4, NFQ_FLAG_BYPASS = 1.
					info, ok := e.Info.(*xt.Unknown)
					if !ok || len(*info) < 6 || binary.NativeEndian.Uint16((*info)[4:])&1 == 0 {
						t.Errorf("%v: rule %q queues without bypass", mode, ruleComment(r.UserData))
					}
				}
			}
		}
		if n != 13 {
			t.Errorf("%v: %d queue rules, want 13 (FIN/RST, IP options, 11 data offsets)", mode, n)
		}
	}
}
