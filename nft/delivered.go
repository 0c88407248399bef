package nft

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
)

// SetDelivered names the BE's set of connections the web server owns
// (`[be] deliver = socket`): client address and port, like the FE's keys.
const SetDelivered = "delivered"

// ChainDelivered is the BE's chain for a delivered connection's packets.
const ChainDelivered = "delivered"

// DeliveredParams are what the BE's ip table depends on.
type DeliveredParams struct {
	// VIP: its TCP flows in @delivered are judged, whatever the port (the
	// agent learns the VIP's ports from its FEs, after the table is in;
	// it puts only HTTP connections in the set).
	VIP netip.Addr
	// IdleTimeout is how long a delivered connection may go without a
	// packet before its element goes: the backstop for a close the agent
	// did not see (it was down, or the queue overflowed).
	IdleTimeout time.Duration
	Size        uint32
	QueueNum    uint16
	Queue       QueueMode
}

// Delivered describes the BE's ip table: the seed's BE rules (4.8.3) for
// connections the web server owns. Their client segments with payload go
// to the agent, which reads where each request starts and lets through
// what is this BE's (queue.Stream); their FIN and RST go to it too, for
// TIME_WAIT; pure ACKs, the bulk of an upload's and a download's packets,
// stay in the kernel. Every queue rule has the bypass flag: with no agent
// reading the queue (it died, or is restarting) the kernel accepts the
// packet, and the web server keeps serving its connections to the end;
// only the routing of their later requests to other BEs stops.
//
// nft has no arithmetic to compute a payload's length, so "has payload"
// is `ip length > 20 + 4 × tcp doff`, one rule per data offset (5..15);
// a packet with IP options (ihl ≠ 5, which no client sends here) is
// queued whatever it carries.
func Delivered(p DeliveredParams) *Ruleset {
	t := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: TableName}
	pre := &nftables.Chain{
		Name: "prerouting", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRaw,
	}
	dc := &nftables.Chain{Name: ChainDelivered, Table: t}
	set := &nftables.Set{
		Table: t, Name: SetDelivered, KeyType: keyType, Concatenation: true, Dynamic: true,
		HasTimeout: p.IdleTimeout > 0, Timeout: p.IdleTimeout, Size: p.Size,
		Comment: "connections the web server owns: client flow",
	}
	q := queueBypass(p.QueueNum, p.Queue)
	rs := &Ruleset{Table: t, Chains: []*nftables.Chain{pre, dc}, Sets: []*nftables.Set{set}}
	add := func(c *nftables.Chain, text string, e ...[]expr.Any) {
		rs.Rules = append(rs.Rules, &nftables.Rule{Table: t, Chain: c, Exprs: cat(e...), UserData: comment(text)})
	}
	add(pre, "delivered: refresh, then judge",
		matchVIP(p.VIP, 0)[:4], tcpFlags(tcpSYN, 0, true), loadKey(), lookup(set, false), dynsetUpdate(set),
		[]expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: ChainDelivered}})
	add(dc, "FIN/RST: to the agent (TIME_WAIT)", tcpFlags(tcpFIN|tcpRST, 0, false), counter(), q)
	add(dc, "IP options: to the agent",
		[]expr.Any{
			&expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseNetworkHeader, Offset: 0, Len: 1},
			&expr.Bitwise{SourceRegister: regKey, DestRegister: regKey, Len: 1, Mask: []byte{0x0f}, Xor: []byte{0}},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: regKey, Data: []byte{5}},
		}, counter(), q)
	for doff := byte(5); doff <= 15; doff++ {
		add(dc, fmt.Sprintf("payload (data offset %d): to the agent", doff),
			[]expr.Any{
				&expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseTransportHeader, Offset: 12, Len: 1},
				&expr.Bitwise{SourceRegister: regKey, DestRegister: regKey, Len: 1, Mask: []byte{0xf0}, Xor: []byte{0}},
				&expr.Cmp{Op: expr.CmpOpEq, Register: regKey, Data: []byte{doff << 4}},
				&expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseNetworkHeader, Offset: 2, Len: 2},
				&expr.Cmp{Op: expr.CmpOpGt, Register: regKey, Data: binaryutil.BigEndian.PutUint16(20 + 4*uint16(doff))},
			}, counter(), q)
	}
	return rs
}

// queueBypass hands the packet to NFQUEUE num with the bypass flag: the
// kernel accepts it when no process reads the queue.
func queueBypass(num uint16, mode QueueMode) []expr.Any {
	if mode == QueueNative {
		return []expr.Any{&expr.Queue{Num: num, Total: 1, Flag: expr.QueueFlagBypass}}
	}
	// struct xt_NFQ_info_v3 (include/uapi/linux/netfilter/xt_NFQUEUE.h):
	// __u16 queuenum, queues_total, flags (NFQ_FLAG_BYPASS = 1); host
	// byte order, padded to 8.
	info := xt.Unknown(make([]byte, 8))
	binary.NativeEndian.PutUint16(info[0:], num)
	binary.NativeEndian.PutUint16(info[2:], 1)
	binary.NativeEndian.PutUint16(info[4:], 1)
	return []expr.Any{&expr.Target{Name: "NFQUEUE", Rev: 3, Info: &info}}
}

// InstallDelivered installs the BE's ip table with the first of modes the
// kernel takes (see InstallFE).
func InstallDelivered(c *nftables.Conn, p DeliveredParams, modes []QueueMode) (*Ruleset, QueueMode, error) {
	var errs []error
	for _, mode := range modes {
		p.Queue = mode
		rs := Delivered(p)
		if err := Apply(c, rs); err != nil {
			errs = append(errs, fmt.Errorf("with the %v: %w", mode, err))
			continue
		}
		return rs, mode, nil
	}
	return nil, 0, fmt.Errorf("install the BE's delivered table: %v", errs)
}
