package wire

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// PHTTP is what a BE does with a later request on a keep-alive connection
// whose rules pick another BE.
type PHTTP uint8

const (
	// PHTTPSingle serves every request of a connection where its first
	// went (TCPHA 0.2).
	PHTTPSingle PHTTP = 0
	// PHTTPForward fetches the request from the other BE's web server and
	// relays the answer (back-end forwarding, Aron et al. 1999).
	PHTTPForward PHTTP = 1
	// PHTTPMulti moves the connection itself to the other BE (TCPHA 0.3's
	// multi-handoff).
	PHTTPMulti PHTTP = 2
)

func (p PHTTP) String() string {
	switch p {
	case PHTTPSingle:
		return "single"
	case PHTTPForward:
		return "forward"
	case PHTTPMulti:
		return "multi"
	}
	return fmt.Sprintf("phttp(%d)", uint8(p))
}

// Cluster is the payload of a Cluster frame: the FE's scheduling as its BEs
// need it to route later requests themselves, so that the rules live in
// one place (the FE's config, its registrations) and stay consistent.
type Cluster struct {
	PHTTP PHTTP
	// AcceptBE says the BEs accept new connections ([fe] accept = be):
	// each listens on VIP:port and routes the first request too. Sent as
	// the top bit of the phttp byte, so that a cluster with accept = fe
	// encodes as before and BEs of an older release still read it.
	AcceptBE bool

	Policy  string // the default scheduler
	Servers []ClusterServer
	Rules   []ClusterRule

	// Loads, when set, is the FE's load view: one figure per server, in
	// Servers' order, each the connections the FE counts on that BE (its
	// own and what the BE's last probe reported). With accept = be a
	// BE's lard and wlc decide from it where a first request is served.
	// Sent after the rules, flagged by clusterLoads in the phttp byte: a
	// frame without loads encodes as before, and a BE of an older release
	// refuses one with loads as a bad phttp value (an explicit version
	// bump, not a silent misreading).
	Loads []uint32
}

// ClusterServer is one BE.
type ClusterServer struct {
	Addr   netip.Addr
	Port   uint16
	Weight uint16
}

// ClusterRule is one rule, in order.
type ClusterRule struct {
	Targets []netip.Addr
	Local   bool   // the FE's local node
	Policy  string // empty: the default
	// Host is the rule's `host=` pattern as written; empty: every host.
	// Pattern is its path pattern; empty (only with a Host): every path.
	Host    string
	Pattern string
}

// Cluster.AcceptBE's and Cluster.Loads' bits in the phttp byte.
const (
	clusterAcceptBE = 0x80
	clusterLoads    = 0x40
)

// Rule flags.
const (
	ruleLocal = 1 << iota
	ruleHost  // a host pattern follows the path pattern
)

// Bounds of a Cluster payload.
const (
	MaxClusterServers = 4096
	MaxClusterRules   = 4096
	MaxRuleTargets    = 255
	maxPolicyName     = 16
)

// MarshalBinary encodes the Cluster payload: phttp, policy, the servers
// (IPv4 address, port, weight), then each rule's flags, policy, targets and
// pattern.
func (c Cluster) MarshalBinary() ([]byte, error) {
	if len(c.Servers) > MaxClusterServers || len(c.Rules) > MaxClusterRules {
		return nil, fmt.Errorf("%w: %d servers, %d rules", ErrFormat, len(c.Servers), len(c.Rules))
	}
	if len(c.Policy) > maxPolicyName {
		return nil, fmt.Errorf("%w: policy %q", ErrFormat, c.Policy)
	}
	if c.Loads != nil && len(c.Loads) != len(c.Servers) {
		return nil, fmt.Errorf("%w: %d loads for %d servers", ErrFormat, len(c.Loads), len(c.Servers))
	}
	mode := byte(c.PHTTP)
	if c.AcceptBE {
		mode |= clusterAcceptBE
	}
	if c.Loads != nil {
		mode |= clusterLoads
	}
	b := []byte{mode, byte(len(c.Policy))}
	b = append(b, c.Policy...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(c.Servers)))
	for _, s := range c.Servers {
		if !s.Addr.Is4() {
			return nil, fmt.Errorf("%w: server %v", ErrFormat, s.Addr)
		}
		a := s.Addr.As4()
		b = append(b, a[:]...)
		b = binary.BigEndian.AppendUint16(b, s.Port)
		b = binary.BigEndian.AppendUint16(b, s.Weight)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(c.Rules)))
	for _, r := range c.Rules {
		if len(r.Targets) > MaxRuleTargets || len(r.Policy) > maxPolicyName ||
			(len(r.Pattern) == 0 && r.Host == "") || len(r.Pattern) > MaxRegisterPattern || len(r.Host) > MaxRegisterPattern {
			return nil, fmt.Errorf("%w: rule host %q path %q", ErrFormat, r.Host, r.Pattern)
		}
		var flags byte
		if r.Local {
			flags |= ruleLocal
		}
		if r.Host != "" {
			flags |= ruleHost
		}
		b = append(b, flags, byte(len(r.Policy)))
		b = append(b, r.Policy...)
		b = append(b, byte(len(r.Targets)))
		for _, t := range r.Targets {
			if !t.Is4() {
				return nil, fmt.Errorf("%w: rule target %v", ErrFormat, t)
			}
			a := t.As4()
			b = append(b, a[:]...)
		}
		b = binary.BigEndian.AppendUint16(b, uint16(len(r.Pattern)))
		b = append(b, r.Pattern...)
		if r.Host != "" {
			b = binary.BigEndian.AppendUint16(b, uint16(len(r.Host)))
			b = append(b, r.Host...)
		}
	}
	if c.Loads != nil {
		b = binary.BigEndian.AppendUint16(b, uint16(len(c.Loads)))
		for _, l := range c.Loads {
			b = binary.BigEndian.AppendUint32(b, l)
		}
	}
	return b, nil
}

// UnmarshalBinary decodes a Cluster payload.
func (c *Cluster) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	m := d.u8()
	mode := PHTTP(m &^ (clusterAcceptBE | clusterLoads))
	policy := string(d.take(int(d.u8())))
	if d.err == nil && (mode > PHTTPMulti || len(policy) > maxPolicyName) {
		return fmt.Errorf("%w: cluster phttp %d, policy of %d bytes", ErrFormat, mode, len(policy))
	}
	out := Cluster{PHTTP: mode, AcceptBE: m&clusterAcceptBE != 0, Policy: policy}
	n := d.u16()
	if d.err == nil && n > MaxClusterServers {
		return fmt.Errorf("%w: %d servers", ErrFormat, n)
	}
	for range n {
		a := d.take(4)
		port, w := d.u16(), d.u16()
		if d.err != nil {
			return d.err
		}
		out.Servers = append(out.Servers, ClusterServer{Addr: netip.AddrFrom4([4]byte(a)), Port: port, Weight: w})
	}
	n = d.u16()
	if d.err == nil && n > MaxClusterRules {
		return fmt.Errorf("%w: %d rules", ErrFormat, n)
	}
	for range n {
		flags := d.u8()
		pol := d.take(int(d.u8()))
		if d.err == nil && (flags&^(ruleLocal|ruleHost) != 0 || len(pol) > maxPolicyName) {
			return fmt.Errorf("%w: rule flags 0x%02x, policy of %d bytes", ErrFormat, flags, len(pol))
		}
		r := ClusterRule{Local: flags&ruleLocal != 0, Policy: string(pol)}
		for range d.u8() {
			a := d.take(4)
			if d.err != nil {
				return d.err
			}
			r.Targets = append(r.Targets, netip.AddrFrom4([4]byte(a)))
		}
		l := d.u16()
		if d.err == nil && ((l == 0 && flags&ruleHost == 0) || l > MaxRegisterPattern) {
			return fmt.Errorf("%w: pattern of %d bytes", ErrFormat, l)
		}
		r.Pattern = string(d.take(int(l)))
		if flags&ruleHost != 0 {
			l := d.u16()
			if d.err == nil && (l == 0 || l > MaxRegisterPattern) {
				return fmt.Errorf("%w: host pattern of %d bytes", ErrFormat, l)
			}
			r.Host = string(d.take(int(l)))
		}
		if d.err != nil {
			return d.err
		}
		out.Rules = append(out.Rules, r)
	}
	if m&clusterLoads != 0 {
		n = d.u16()
		if d.err == nil && int(n) != len(out.Servers) {
			return fmt.Errorf("%w: %d loads for %d servers", ErrFormat, n, len(out.Servers))
		}
		out.Loads = make([]uint32, 0, n)
		for range n {
			out.Loads = append(out.Loads, d.u32())
		}
	}
	switch {
	case d.err != nil:
		return d.err
	case len(d.b) != 0:
		return fmt.Errorf("%w: %d trailing bytes in cluster", ErrFormat, len(d.b))
	}
	*c = out
	return nil
}
