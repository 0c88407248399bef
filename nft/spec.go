// Package nft describes and installs tcpha's own nftables tables.
//
// The builders in this file are pure: they turn role parameters into
// google/nftables values (tables, chains, sets, rules) without touching the
// kernel, so the exact netlink bytes are testable with nftables.WithTestDial.
// Everything tcpha installs lives in one table named "tcpha" per family,
// created and replaced atomically; other software's tables are never touched.
package nft

import (
	"encoding/binary"
	"net/netip"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
)

// TableName is the name of every table tcpha owns.
const TableName = "tcpha"

// Set names on the FE. They are part of the operator's view (`nft list
// ruleset`) and of the agent's restart contract: keep them stable.
const (
	SetFresh   = "fresh"   // client 4-tuples seen with a SYN: served by the FE
	MapForward = "forward" // HANDOFFED: client 4-tuple → BE address
	SetClosing = "closing" // HANDOFFED flows that carried FIN or RST
	SetAlive   = "alive"   // HANDOFFED flows that carried any packet lately
	SetPorts   = "ports"   // the VIP's ports when it has two (HTTP and TLS)
)

// Ruleset is a plain description of one table and its contents.
type Ruleset struct {
	Table  *nftables.Table
	Chains []*nftables.Chain
	Sets   []*nftables.Set
	Rules  []*nftables.Rule
	// Init holds elements installed with their set, by set name: the flows
	// an agent takes over from its predecessor.
	Init map[string][]nftables.SetElement
}

// Set returns the named set of the ruleset, or nil.
func (r *Ruleset) Set(name string) *nftables.Set {
	for _, s := range r.Sets {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// FEParams are what the FE's table depends on.
type FEParams struct {
	VIP  netip.Addr
	Port uint16
	// TLSPort is the VIP's second port, for TLS (0: none). Its flows get
	// the same treatment as Port's, in the same sets: see keyType.
	TLSPort uint16
	// FreshTimeout is how long a new connection stays local after its SYN;
	// it must cover reading the request and the handoff.
	FreshTimeout time.Duration
	// TimeWait sizes @closing's timeout, which marks flows whose first FIN
	// or RST was already queued; the agent deletes the entry sooner.
	TimeWait time.Duration
	// IdleTimeout is how long a forwarded flow may go without a packet.
	IdleTimeout time.Duration
	// Size caps each set (a dynamic set without one is capped at 65535).
	Size uint32
	// QueueNum is the NFQUEUE queue the agent reads; Queue how the rule
	// reaches it.
	QueueNum uint16
	Queue    QueueMode
}

// QueueMode is how a rule hands a packet to NFQUEUE.
type QueueMode uint8

const (
	// QueueNative is nft's own queue expression (CONFIG_NFT_QUEUE).
	QueueNative QueueMode = iota
	// QueueCompat is the xtables NFQUEUE target through nft_compat, for
	// kernels without nft_queue, such as this project's (FACTS.md).
	QueueCompat
)

func (m QueueMode) String() string {
	if m == QueueCompat {
		return "xtables NFQUEUE target (nft_compat)"
	}
	return "native nft queue"
}

// keyType is the flow key: the client's address and port. The VIP is fixed
// by the rules' match, so it need not be in the key.
//
// With a TLS port the VIP has two ports and the key leaves the VIP's port
// out all the same: the connection table, the handoff frames and the
// agent's restart contract all name a flow by the client's address and
// port, and a three-field key would change every one of them. The cost is
// one collision: one client address and port open to both of the VIP's
// ports at once. Linux's connect() makes it rare (its ephemeral port search
// starts at a hash of the destination, port included), but a NAT that keeps
// its inside hosts' ports makes it possible. The second SYN is then taken
// for a reused port (rule 2): the first connection, if handed off, has its
// packets delivered locally while the second is fresh, where no socket
// holds it, so the FE resets it; the second connection is served. Adding
// the VIP's port to the key is the fix (docs/design.md, "Two ports, one
// flow key").
var keyType = nftables.MustConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService)

// TCP header flag bits (RFC 9293 section 3.1).
const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// Registers: a concatenated key occupies NFT_REG32_00 and NFT_REG32_01,
// each field padded to 4 bytes (FACTS.md); results go to NFT_REG_2.
const (
	regKey    = 1 // NFT_REG_1, aliased by NFT_REG32_00 for the first field
	regKeyPt2 = 9 // NFT_REG32_01
	regData   = 2 // NFT_REG_2
)

// FE describes the FE's table: family ip, one prerouting chain at raw
// priority, so it runs before conntrack and before the packet is routed to
// the local socket.
//
// The order of the rules is the state machine's fast path:
//  1. all VIP:port traffic is untracked (handed-off flows would otherwise sit
//     in conntrack as ESTABLISHED for five days, FACTS.md);
//  2. a SYN is always local; one from a client port whose previous
//     connection is still forwarded marks its flow fresh, so the new
//     connection never reaches the previous connection's BE. Only reused
//     ports get the mark: a handoff then has no mark to remove;
//  3. fresh flows are local (a connection that is not forwarded is local
//     anyway, and one HANDOFFING drops the client's packets at its socket,
//     see repair.Block);
//  4. the first FIN or RST of a HANDOFFED flow is copied to its BE, marked
//     closing, and queued to the agent, which moves the connection to
//     TIME_WAIT. Queueing comes after the copy and without the bypass flag:
//     the agent only observes, and when it is down the kernel drops the
//     original while the BE still gets its copy;
//  5. every other packet of a HANDOFFED flow is copied to its BE and
//     dropped here, never leaving the kernel; it then marks the flow alive;
//  6. a forwarded packet whose alive mark failed is dropped: it was copied
//     to its BE already.
//
// A set update from the packet path fails when its set is full, and a
// failed expression ends its rule there. So no rule's forwarding or drop
// may depend on an update that comes before it: @closing's update precedes
// the copy in rule 4 (a full @closing falls through to rule 5, which copies
// the packet once; the agent then misses that FIN and the flow ends by
// idle expiry), and @alive's update follows the copy in rule 5, with rule 6
// to drop what it leaves. Without that, a full set handed the packet to the
// FE's own stack, which has no socket for the flow and answered with RST
// (issue 19). A full @fresh (rule 2) lets rule 3 take the SYN, and the new
// connection's later packets go to the previous connection's BE: the one
// case a full set still costs a client, and @fresh only holds reused ports.
func FE(p FEParams) *Ruleset {
	t := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: TableName}
	c := &nftables.Chain{
		Name: "prerouting", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRaw,
	}
	set := func(name string, timeout time.Duration, dynamic bool, comment string) *nftables.Set {
		return &nftables.Set{
			Table: t, Name: name, KeyType: keyType, Concatenation: true,
			Dynamic: dynamic, HasTimeout: timeout > 0, Timeout: timeout, Size: p.Size, Comment: comment,
		}
	}
	fresh := set(SetFresh, p.FreshTimeout, true, "new connections from client ports still forwarded: served by the FE")
	fwd := set(MapForward, 0, false, "HANDOFFED: client flow -> BE")
	fwd.IsMap, fwd.DataType = true, nftables.TypeIPAddr
	closing := set(SetClosing, 2*p.TimeWait, true, "HANDOFFED flows whose FIN or RST the agent has seen")
	alive := set(SetAlive, p.IdleTimeout, true, "HANDOFFED flows with recent packets")

	vip := matchVIP(p.VIP, p.Port)
	var ports *nftables.Set
	if p.TLSPort != 0 {
		ports = &nftables.Set{Table: t, Name: SetPorts, KeyType: nftables.TypeInetService, Constant: true,
			Comment: "the VIP's HTTP and TLS ports"}
		vip = matchVIPPorts(p.VIP, ports)
	}
	rules := [][]expr.Any{
		cat(vip, []expr.Any{&expr.Notrack{}}),
		cat(vip, tcpFlags(tcpSYN|tcpACK, tcpSYN, true),
			loadKey(), lookup(fwd, false), dynsetUpdate(fresh), counter(), verdict(expr.VerdictAccept)),
		cat(vip, tcpFlags(tcpSYN|tcpACK, tcpSYN, true), counter(), verdict(expr.VerdictAccept)),
		cat(vip, loadKey(), lookup(fresh, false), verdict(expr.VerdictAccept)),
		cat(vip, tcpFlags(tcpFIN|tcpRST, 0, false), loadKey(), notIn(closing),
			lookup(fwd, true), dynsetUpdate(closing), dup(), counter(), queue(p)),
		cat(vip, loadKey(), lookup(fwd, true), dup(), dynsetUpdate(alive), counter(), verdict(expr.VerdictDrop)),
		cat(vip, loadKey(), lookup(fwd, false), counter(), verdict(expr.VerdictDrop)),
	}
	comments := []string{
		"untrack the VIP",
		"SYN from a port still forwarded: local, mark fresh",
		"SYN: local",
		"fresh: local",
		"HANDOFFED first FIN/RST: forward, tell the agent",
		"HANDOFFED: forward to BE",
		"forwarded above, @alive full: drop",
	}
	rs := &Ruleset{Table: t, Chains: []*nftables.Chain{c}, Sets: []*nftables.Set{fresh, fwd, closing, alive}}
	if ports != nil {
		rs.Sets = append(rs.Sets, ports)
		rs.Init = map[string][]nftables.SetElement{SetPorts: {
			{Key: binaryutil.BigEndian.PutUint16(p.Port)}, {Key: binaryutil.BigEndian.PutUint16(p.TLSPort)},
		}}
	}
	for i, e := range rules {
		rs.Rules = append(rs.Rules, &nftables.Rule{Table: t, Chain: c, Exprs: e, UserData: comment(comments[i])})
	}
	return rs
}

// BEParams are what the BE's ARP table depends on.
type BEParams struct {
	VIP   netip.Addr
	UAddr netip.Addr // an address the cluster does not use
}

// ARP hook numbers. In the arp family input is 0 and output is 1
// (include/uapi/linux/netfilter_arp.h NF_ARP_IN, NF_ARP_OUT); the library's
// ChainHookInput carries the IP numbering and would make an output chain
// (FACTS.md).
var (
	arpHookIn  = nftables.ChainHookRef(0)
	arpHookOut = nftables.ChainHookRef(1)
)

// ARP header offsets from the network header for Ethernet/IPv4 (RFC 826).
const (
	arpOffHLen     = 4
	arpOffOp       = 6
	arpOffSenderIP = 14
	arpOffTargetIP = 24
	arpOpRequest   = 1
)

// BE describes the BE's ARP filter (seed 4.4). The VIP sits on the BE's
// loopback and must stay silent: requests for it are dropped, and the BE's
// own ARP never carries it as sender, because a client that sees "VIP is at
// BE's MAC" sends the whole cluster's traffic to this BE (FACTS.md). The
// inbound rewrite is the seed's: an ARP from the FE with sender VIP would be
// discarded as coming from ourselves, so it is renamed to uaddr, and the
// answer to uaddr is renamed back to the VIP on its way out.
func BE(p BEParams) *Ruleset {
	t := &nftables.Table{Family: nftables.TableFamilyARP, Name: TableName}
	in := &nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter, Hooknum: arpHookIn, Priority: nftables.ChainPriorityFilter}
	out := &nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter, Hooknum: arpHookOut, Priority: nftables.ChainPriorityFilter}
	vip, uaddr := p.VIP.AsSlice(), p.UAddr.AsSlice()
	ethIPv4 := cat(arpField(arpOffHLen, 2), eq([]byte{6, 4})) // hlen 6, plen 4
	rule := func(c *nftables.Chain, text string, e ...[]expr.Any) *nftables.Rule {
		return &nftables.Rule{Table: t, Chain: c, Exprs: cat(append([][]expr.Any{ethIPv4}, e...)...), UserData: comment(text)}
	}
	return &Ruleset{
		Table:  t,
		Chains: []*nftables.Chain{in, out},
		Rules: []*nftables.Rule{
			rule(in, "never answer for the VIP",
				arpField(arpOffOp, 2), eq(binaryutil.BigEndian.PutUint16(arpOpRequest)),
				arpField(arpOffTargetIP, 4), eq(vip), counter(), verdict(expr.VerdictDrop)),
			rule(in, "the FE's VIP is not ours: call it uaddr",
				arpField(arpOffSenderIP, 4), eq(vip), arpSet(arpOffSenderIP, uaddr), counter()),
			rule(out, "never announce the VIP: say uaddr",
				arpField(arpOffSenderIP, 4), eq(vip), arpSet(arpOffSenderIP, uaddr), counter()),
			rule(out, "answers to uaddr go to the VIP",
				arpField(arpOffTargetIP, 4), eq(uaddr), arpSet(arpOffTargetIP, vip), counter()),
		},
	}
}

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func eq(b []byte) []expr.Any {
	return []expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: regKey, Data: b}}
}

func matchVIP(vip netip.Addr, port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: regKey, Data: vip.AsSlice()},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: regKey},
		&expr.Cmp{Op: expr.CmpOpEq, Register: regKey, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: regKey, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

// matchVIPPorts is matchVIP for a VIP with several ports: `ip daddr VIP
// tcp dport @ports`. A named constant set, because an anonymous one may be
// bound to one rule only.
func matchVIPPorts(vip netip.Addr, ports *nftables.Set) []expr.Any {
	m := matchVIP(vip, 0)
	return append(m[:len(m)-1], lookup(ports, false)...)
}

// tcpFlags matches `tcp flags & mask == want` (or != want when equal is false).
func tcpFlags(mask, want uint8, equal bool) []expr.Any {
	op := expr.CmpOpEq
	if !equal {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		&expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: regKey, DestRegister: regKey, Len: 1, Mask: []byte{mask}, Xor: []byte{0}},
		&expr.Cmp{Op: op, Register: regKey, Data: []byte{want}},
	}
}

// loadKey loads `ip saddr . tcp sport` into the key registers.
func loadKey() []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Payload{DestRegister: regKeyPt2, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
	}
}

func lookup(s *nftables.Set, toData bool) []expr.Any {
	l := &expr.Lookup{SourceRegister: regKey, SetName: s.Name}
	if toData {
		l.DestRegister, l.IsDestRegSet = regData, true
	}
	return []expr.Any{l}
}

func notIn(s *nftables.Set) []expr.Any {
	return []expr.Any{&expr.Lookup{SourceRegister: regKey, SetName: s.Name, Invert: true}}
}

// queue hands the packet to NFQUEUE p.QueueNum, without the bypass flag.
func queue(p FEParams) []expr.Any {
	if p.Queue == QueueNative {
		return []expr.Any{&expr.Queue{Num: p.QueueNum, Total: 1}}
	}
	// struct xt_NFQ_info_v3 (include/uapi/linux/netfilter/xt_NFQUEUE.h):
	// __u16 queuenum, queues_total, flags; host byte order, padded to 8.
	info := xt.Unknown(make([]byte, 8))
	binary.NativeEndian.PutUint16(info[0:], p.QueueNum)
	binary.NativeEndian.PutUint16(info[2:], 1)
	return []expr.Any{&expr.Target{Name: "NFQUEUE", Rev: 3, Info: &info}}
}

func dynsetUpdate(s *nftables.Set) []expr.Any {
	return []expr.Any{&expr.Dynset{SrcRegKey: regKey, SetName: s.Name, Operation: unix.NFT_DYNSET_OP_UPDATE}}
}

// dup copies the packet towards the BE address in regData; the kernel routes
// it there unchanged (destination still the VIP), like the seed's IP tunnel
// without the encapsulation (FACTS.md variant b).
func dup() []expr.Any { return []expr.Any{&expr.Dup{RegAddr: regData}} }

func counter() []expr.Any { return []expr.Any{&expr.Counter{}} }

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

func arpField(off, n uint32) []expr.Any {
	return []expr.Any{&expr.Payload{DestRegister: regKey, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n}}
}

func arpSet(off uint32, v []byte) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: regKey, Data: v},
		&expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: regKey, Base: expr.PayloadBaseNetworkHeader,
			Offset: off, Len: uint32(len(v)), CsumType: expr.CsumTypeNone},
	}
}

// comment encodes a rule comment the way nft(8) stores it, so `nft list
// ruleset` prints it (libnftnl udata: type 0 = NFTNL_UDATA_RULE_COMMENT,
// length, NUL-terminated text).
func comment(s string) []byte {
	b := []byte{0, byte(len(s) + 1)}
	b = append(b, s...)
	return append(b, 0)
}
