package nft

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// MapSlots is the FE's placement map with `accept = be`: hash slot → a jump
// to the chain of the slot's BE. The agent edits it element by element
// (SlotElement) when backends.Slots changes.
const MapSlots = "slots"

// Placement is what the FE's table adds with `accept = be`: new flows get
// their BE from the packet path and are pinned in @forward by the rule.
type Placement struct {
	// BEs are the BEs that may hold slots: each gets a chain. A BE that
	// holds a slot must be listed.
	BEs []netip.Addr
	// Slots maps slot i to its BE (backends.Slots); empty when no BE takes
	// new connections, or to install the table first and fill it by
	// element edits.
	Slots []netip.Addr
	// Modulus is the number of slots the packet path hashes to
	// (backends.SlotCount), fixed for the table's life.
	Modulus uint32
	// Seed is jhash's seed. Every FE of a cluster should use the same, so
	// that a client's flows hash alike whichever FE holds the VIP; it must
	// not be 0, for which the library sends no seed and the kernel draws a
	// random one (nft_hash.c), which SlotOf cannot know.
	Seed uint32
	// PinTimeout is how long a pinned flow stays in @forward until it
	// sends a request (a segment with PSH): a SYN flood, or a client that
	// connects and never asks, holds an element this long, not
	// IdleTimeout. It must cover the handshake and the request's arrival
	// (requesttimeout).
	PinTimeout time.Duration
}

// MapBEs is the FE's map BE address → a jump to the chain that keeps that
// BE's pinned flows' timeouts and forwards them, with `accept = be`.
const MapBEs = "bes"

// PlaceChain names the chain that forwards new flows to be and pins them;
// PinnedChain the one for flows pinned to be.
func PlaceChain(be netip.Addr) string  { return "place_" + be.String() }
func PinnedChain(be netip.Addr) string { return "pinned_" + be.String() }

// SlotKey encodes a slot number as the slot map's key: jhash leaves a u32 in
// host byte order in its register (net/netfilter/nft_hash.c), and the map's
// key type is mark, a host-order u32, so nft prints it like the hash.
func SlotKey(slot uint32) []byte { return binary.NativeEndian.AppendUint32(nil, slot) }

// SlotElement is slot's element of the slot map: a jump to be's placing
// chain.
func SlotElement(slot uint32, be netip.Addr) nftables.SetElement {
	return nftables.SetElement{Key: SlotKey(slot), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: PlaceChain(be)}}
}

// BEElement is be's element of @bes: a jump to its pinned chain.
func BEElement(be netip.Addr) nftables.SetElement {
	return nftables.SetElement{Key: be.AsSlice(), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: PinnedChain(be)}}
}

// dynsetOpDelete is NFT_DYNSET_OP_DELETE (linux/netfilter/nf_tables.h,
// since 5.16), which x/sys does not name.
const dynsetOpDelete = 2

// unmark removes the packet's flow (in the key register) from s; a flow
// not in s is no error, and the rule goes on.
func unmark(s *nftables.Set) []expr.Any {
	return []expr.Any{&expr.Dynset{SrcRegKey: regKey, SetName: s.Name, Operation: dynsetOpDelete}}
}

// tcpPSH is the PUSH flag (RFC 9293 section 3.1).
const tcpPSH = 0x08

// FEPlace describes the FE's table for `accept = be`, where the FE's own
// stack answers a client only when no BE takes new connections: every
// other packet for VIP:port leaves for a BE or is dropped.
//
// New flows are placed by the packet path (FACTS.md, "Placing new flows"):
// `jhash ip saddr . tcp sport mod N` picks a slot, the verdict map @slots
// jumps to the slot's BE's place_ chain, and that chain copies a SYN to the
// BE and pins it with `add @forward { ip saddr . tcp sport : BE }`, the BE
// an immediate. Later packets find their flow in @forward; its BE, through
// the packet's mark, selects the BE's pinned_ chain in @bes, which
// refreshes the pin's timeout and copies the packet there.
//
// Why this shape: nft 1.0.6 aborts `nft list ruleset` (netlink_delinearize.c
// "Assertion `consumed > 0'") on any rule in which a map look-up's result
// feeds a dynset's data, a bitwise or another look-up (measured here: a
// hash looked up in a slot map as the pin's data; `update @forward { … :
// ip saddr . tcp sport map @forward }`; `… map @forward vmap @bes`).
// It prints a hash fed straight into a verdict map, a map look-up stored
// in the mark, the mark looked up in a verdict map, and a dynset whose data
// is an immediate. So every dynset's data is the BE's address written in
// that BE's chain, which is also right when an update recreates an element
// that expired under it. The mark of VIP:port packets is scratch: they are
// dropped here, and only their copies to the BEs carry it out.
//
// The prerouting rules, in order:
//  1. all VIP:port traffic is untracked, as in FE;
//  2. a pinned flow goes to its BE's pinned_ chain;
//  3. a pinned flow whose BE has no chain is copied there as it is;
//  4. any other packet is placed by hash: the slot's BE's place_ chain;
//  5. a packet whose slot has no BE (none takes new connections) goes to
//     the FE's own stack, whose frontend answers 503 (a drop left clients
//     waiting for their connect timeout: 2 min for curl).
//
// A BE's pinned_ chain: a SYN (a retransmission, or a client port reused)
// clears the flow's closing mark and starts PinTimeout again; a flow
// that has sent a FIN or RST (in @closing) keeps its pin for TimeWait from
// its last packet, so its end costs the agent nothing: the kernel forgets
// it TimeWait after the client's last segment (issue 14 measured this
// against queueing the FIN to the agent, as FE does; docs/performance.md);
// a flow that has sent a request (in @alive)
// keeps its pin for IdleTimeout from its last packet; its first segment
// with PSH is its request and puts it in @alive; a flow that has not sent
// one keeps PinTimeout from its last packet, so one that never asks loses
// its element that soon; then the packet is copied and dropped. The
// refreshes carry no verdict: one that fails (a full @alive) ends its rule
// and the copy still follows.
//
// A BE's place_ chain copies a SYN before pinning it, and the rule after
// drops a SYN whose pin failed (a full @forward): a flood that fills the
// map leaves new SYNs reaching their BE by hash, and their later packets,
// unpinned, follow the hash too (rule 5), which holds while the slot keeps
// its BE. Packets of unpinned flows other than SYNs are copied, never
// pinned, so a flood of stray segments cannot fill the map. No other path
// sends a packet to the FE's stack (issue 19).
func FEPlace(p FEParams, pl Placement) *Ruleset {
	t := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: TableName}
	pre := &nftables.Chain{
		Name: "prerouting", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRaw,
	}
	set := func(name string, timeout time.Duration, comment string) *nftables.Set {
		return &nftables.Set{
			Table: t, Name: name, KeyType: keyType, Concatenation: true,
			Dynamic: true, HasTimeout: timeout > 0, Timeout: timeout, Size: p.Size, Comment: comment,
		}
	}
	fwd := set(MapForward, p.IdleTimeout, "pinned and HANDOFFED: client flow -> BE")
	fwd.IsMap, fwd.DataType = true, nftables.TypeIPAddr
	closing := set(SetClosing, 2*p.TimeWait, "pinned flows that have sent a FIN or RST")
	alive := set(SetAlive, p.IdleTimeout, "pinned flows that have sent a request")
	slots := &nftables.Set{
		Table: t, Name: MapSlots, KeyType: nftables.TypeMark, KeyByteOrder: binaryutil.NativeEndian,
		IsMap: true, DataType: nftables.TypeVerdict,
		Comment: "hash slot -> its BE's place_ chain",
	}
	bes := &nftables.Set{
		Table: t, Name: MapBEs, KeyType: nftables.TypeIPAddr, IsMap: true, DataType: nftables.TypeVerdict,
		Comment: "BE -> its pinned_ chain",
	}

	vip := matchVIP(p.VIP, p.Port)
	vmap := func(src uint32, s *nftables.Set) []expr.Any {
		return []expr.Any{&expr.Lookup{SourceRegister: src, SetName: s.Name, DestRegister: 0, IsDestRegSet: true}}
	}
	rs := &Ruleset{Table: t, Chains: []*nftables.Chain{pre}, Sets: []*nftables.Set{fwd, closing, alive, slots, bes},
		Init: map[string][]nftables.SetElement{}}
	add := func(c *nftables.Chain, text string, e ...[]expr.Any) {
		rs.Rules = append(rs.Rules, &nftables.Rule{Table: t, Chain: c, Exprs: cat(e...), UserData: comment(text)})
	}
	add(pre, "untrack the VIP", vip, []expr.Any{&expr.Notrack{}})
	add(pre, "pinned: to its BE's chain", vip, loadKey(), lookup(fwd, true),
		[]expr.Any{
			&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: regData},
			&expr.Meta{Key: expr.MetaKeyMARK, Register: regData},
		}, vmap(regData, bes))
	add(pre, "pinned to a BE without a chain: forward", vip, loadKey(), lookup(fwd, true), dup(), counter(), verdict(expr.VerdictDrop))
	add(pre, "not pinned: place by hash", vip, loadKey(), counter(), []expr.Any{
		&expr.Hash{SourceRegister: regKey, DestRegister: regData, Length: 8, Modulus: pl.Modulus,
			Seed: pl.Seed, Type: expr.HashTypeJenkins},
	}, vmap(regData, slots))
	// No BE takes new connections: the FE's own stack answers, its
	// frontend with a 503, rather than leave clients' SYNs unanswered.
	add(pre, "no BE for the slot: the FE answers", vip, counter())

	for _, be := range pl.BEs {
		rs.addBEChains(p, pl, be)
	}
	for i, be := range pl.Slots {
		if be.IsValid() {
			rs.Init[MapSlots] = append(rs.Init[MapSlots], SlotElement(uint32(i), be))
		}
	}
	return rs
}

// addBEChains adds be's pinned_ and place_ chains, with their rules, and
// its @bes element to rs (FEPlace), and returns them.
func (rs *Ruleset) addBEChains(p FEParams, pl Placement, be netip.Addr) (chains []*nftables.Chain, rules []*nftables.Rule) {
	t := rs.Table
	fwd, closing, alive := rs.Set(MapForward), rs.Set(SetClosing), rs.Set(SetAlive)
	add := func(c *nftables.Chain, text string, e ...[]expr.Any) {
		r := &nftables.Rule{Table: t, Chain: c, Exprs: cat(e...), UserData: comment(text)}
		rs.Rules = append(rs.Rules, r)
		rules = append(rules, r)
	}
	// A jumped-to chain's rules match the protocol again, so that nft
	// prints `tcp flags`, not `@th,104,8`.
	tcp := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: regKey},
		&expr.Cmp{Op: expr.CmpOpEq, Register: regKey, Data: []byte{unix.IPPROTO_TCP}},
	}
	syn := tcpFlags(tcpSYN|tcpACK, tcpSYN, true)
	to := []expr.Any{&expr.Immediate{Register: regData, Data: be.AsSlice()}}
	copyTo := cat(to, []expr.Any{&expr.Dup{RegAddr: regData}})
	pin := func(op uint32, timeout time.Duration) []expr.Any {
		return cat(to, []expr.Any{&expr.Dynset{SrcRegKey: regKey, SrcRegData: regData, SetName: fwd.Name,
			Operation: op, Timeout: timeout}})
	}
	pinned := &nftables.Chain{Name: PinnedChain(be), Table: t}
	add(pinned, "SYN again: pin for pintimeout", tcp, syn, loadKey(), unmark(closing),
		pin(unix.NFT_DYNSET_OP_UPDATE, pl.PinTimeout), copyTo, counter(), verdict(expr.VerdictDrop))
	add(pinned, "closing: keep for timewait", tcp, loadKey(), lookup(closing, false),
		pin(unix.NFT_DYNSET_OP_UPDATE, p.TimeWait), copyTo, counter(), verdict(expr.VerdictDrop))
	// The alive mark goes at the first FIN or RST: left to its
	// idletimeout, every ended flow would hold one (issue 19).
	add(pinned, "first FIN/RST: keep for timewait", tcp, tcpFlags(tcpFIN|tcpRST, 0, false), loadKey(),
		dynsetUpdate(closing), unmark(alive), pin(unix.NFT_DYNSET_OP_UPDATE, p.TimeWait), copyTo, counter(), verdict(expr.VerdictDrop))
	add(pinned, "requested: keep for idletimeout", tcp, loadKey(), lookup(alive, false),
		pin(unix.NFT_DYNSET_OP_UPDATE, p.IdleTimeout), dynsetUpdate(alive))
	add(pinned, "first request: keep for idletimeout", tcp, tcpFlags(tcpPSH, tcpPSH, true), loadKey(), notIn(alive),
		pin(unix.NFT_DYNSET_OP_UPDATE, p.IdleTimeout), dynsetUpdate(alive))
	add(pinned, "no request yet: keep for pintimeout", tcp, loadKey(), notIn(alive),
		pin(unix.NFT_DYNSET_OP_UPDATE, pl.PinTimeout))
	add(pinned, "forward", copyTo, counter(), verdict(expr.VerdictDrop))

	place := &nftables.Chain{Name: PlaceChain(be), Table: t}
	add(place, "SYN: forward, pin", tcp, syn, loadKey(), copyTo, pin(unix.NFT_DYNSET_OP_ADD, pl.PinTimeout),
		counter(), verdict(expr.VerdictDrop))
	add(place, "SYN forwarded above, @forward full: not pinned", tcp, syn, counter(), verdict(expr.VerdictDrop))
	add(place, "not pinned: forward by hash", copyTo, counter(), verdict(expr.VerdictDrop))
	chains = []*nftables.Chain{pinned, place}
	rs.Chains = append(rs.Chains, chains...)
	if rs.Init == nil {
		rs.Init = map[string][]nftables.SetElement{}
	}
	rs.Init[MapBEs] = append(rs.Init[MapBEs], BEElement(be))
	return chains, rules
}

// SlotEdit is one slot's change in the slot map: From its BE (invalid:
// none) to To's (invalid: none).
type SlotEdit struct {
	Slot     uint32
	From, To netip.Addr
}

// EditPlacement changes an installed placing table (FEPlace) in one
// transaction: it adds the chains and @bes elements of addBEs, BEs that
// had none, then makes each slot edit. rs, the table as installed, gets
// the new chains and rules, so that a guard comparing shapes sees them.
// Chains of BEs that left stay: a chain the slot map still jumps to cannot
// go, and an empty one costs nothing.
func EditPlacement(c *nftables.Conn, rs *Ruleset, p FEParams, pl Placement, addBEs []netip.Addr, edits []SlotEdit) error {
	slots, bes := rs.Set(MapSlots), rs.Set(MapBEs)
	if slots == nil || bes == nil {
		return fmt.Errorf("edit the placement: the table has no %s or %s map", MapSlots, MapBEs)
	}
	for _, be := range addBEs {
		chains, rules := rs.addBEChains(p, pl, be)
		for _, ch := range chains {
			c.AddChain(ch)
		}
		for _, r := range rules {
			c.AddRule(r)
		}
		if err := c.SetAddElements(bes, []nftables.SetElement{BEElement(be)}); err != nil {
			return fmt.Errorf("edit the placement: add %v to %s: %w", be, MapBEs, err)
		}
	}
	for _, e := range edits {
		if e.From.IsValid() {
			if err := c.SetDeleteElements(slots, []nftables.SetElement{{Key: SlotKey(e.Slot)}}); err != nil {
				return fmt.Errorf("edit the placement: slot %d: %w", e.Slot, err)
			}
		}
		if e.To.IsValid() {
			if err := c.SetAddElements(slots, []nftables.SetElement{SlotElement(e.Slot, e.To)}); err != nil {
				return fmt.Errorf("edit the placement: slot %d: %w", e.Slot, err)
			}
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("edit the placement (%d BEs added, %d slots): %w", len(addBEs), len(edits), err)
	}
	return nil
}

// ReadSlots reads the slot map of a placing table that is installed (a
// predecessor's, at an upgrade): slot → BE. A table without one (none, or
// the FE's) gives an empty map.
func ReadSlots(c *nftables.Conn, t *nftables.Table) (map[uint32]netip.Addr, error) {
	out := map[uint32]netip.Addr{}
	s, err := c.GetSetByName(t, MapSlots)
	if err != nil {
		return out, nil // no placing table
	}
	els, err := c.GetSetElements(s)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", MapSlots, err)
	}
	for _, el := range els {
		chain := verdictChain(el.Val)
		if len(el.Key) != 4 || !strings.HasPrefix(chain, "place_") {
			continue
		}
		if be, err := netip.ParseAddr(strings.TrimPrefix(chain, "place_")); err == nil {
			out[binary.NativeEndian.Uint32(el.Key)] = be
		}
	}
	return out, nil
}

// verdictChain is the chain a verdict map element jumps to: the library
// leaves the verdict's attributes (NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN)
// undecoded in the element's value.
func verdictChain(b []byte) string {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return ""
	}
	for ad.Next() {
		if ad.Type() == unix.NFTA_VERDICT_CHAIN {
			return ad.String()
		}
	}
	return ""
}
