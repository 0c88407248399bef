package wire

import (
	"fmt"
	"net/netip"
)

// A BE whose agent crashed, or that reset a client itself, ends connections
// without the FE seeing a FIN or RST: the BE's kernel answers the client
// directly. The FE asks each BE which of its clients' connections it still
// holds (a Held frame, answered page by page) and ends the forwarding of
// the rows the BE no longer has (agent/held.go, conntab.Table.Unheld).

// MaxHeldFlows bounds one page of a HeldList: 4,096 flows of 7 bytes, 28 KiB.
const MaxHeldFlows = 4096

// HeldAsk is the payload of a Held frame: the FE asks for the client flows
// the BE holds on the FE's VIP port that sort after After, in ascending
// order (netip.AddrPort.Compare); the zero After asks from the first.
type HeldAsk struct {
	After netip.AddrPort
}

// MarshalBinary encodes the HeldAsk payload: one address and port, family
// 0 for the zero value.
func (h HeldAsk) MarshalBinary() ([]byte, error) {
	if h.After.IsValid() && !h.After.Addr().Is4() {
		return nil, fmt.Errorf("%w: held after %v", ErrFormat, h.After)
	}
	return appendAddrPort(make([]byte, 0, addrPortLen), h.After), nil
}

// UnmarshalBinary decodes a HeldAsk payload.
func (h *HeldAsk) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	a := d.addrPortOrZero()
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%w: %d trailing bytes in held", ErrFormat, len(d.b))
	}
	if d.err != nil {
		return d.err
	}
	h.After = a
	return nil
}

// HeldList is the payload of a HeldList frame: one page of the flows a BE
// holds, strictly ascending, and whether more follow (the FE then asks
// again after the last).
type HeldList struct {
	More  bool
	Flows []netip.AddrPort
}

// MarshalBinary encodes the HeldList payload: flags (1: more), a 2-byte
// count, then each flow as family, IPv4 address and port.
func (l HeldList) MarshalBinary() ([]byte, error) {
	if err := l.check(); err != nil {
		return nil, err
	}
	var flags byte
	if l.More {
		flags = 1
	}
	b := make([]byte, 0, 3+len(l.Flows)*addrPortLen)
	b = append(b, flags, byte(len(l.Flows)>>8), byte(len(l.Flows)))
	for _, f := range l.Flows {
		b = appendAddrPort(b, f)
	}
	return b, nil
}

// check holds what both ends rely on: bounded, IPv4, strictly ascending
// (so pages never overlap and asking after the last makes progress), and
// not empty when more follow.
func (l HeldList) check() error {
	if len(l.Flows) > MaxHeldFlows {
		return fmt.Errorf("%w: %d held flows (limit %d)", ErrFormat, len(l.Flows), MaxHeldFlows)
	}
	if l.More && len(l.Flows) == 0 {
		return fmt.Errorf("%w: an empty held page says more follow", ErrFormat)
	}
	for i, f := range l.Flows {
		if !f.Addr().Is4() {
			return fmt.Errorf("%w: held flow %v", ErrFormat, f)
		}
		if i > 0 && l.Flows[i-1].Compare(f) >= 0 {
			return fmt.Errorf("%w: held flows out of order at %v", ErrFormat, f)
		}
	}
	return nil
}

// UnmarshalBinary decodes a HeldList payload.
func (l *HeldList) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	flags := d.u8()
	n := d.u16()
	if d.err == nil && flags&^1 != 0 {
		return fmt.Errorf("%w: held flags 0x%02x", ErrFormat, flags)
	}
	if d.err == nil && int(n) > MaxHeldFlows {
		return fmt.Errorf("%w: %d held flows (limit %d)", ErrFormat, n, MaxHeldFlows)
	}
	out := HeldList{More: flags&1 != 0}
	if d.err == nil {
		out.Flows = make([]netip.AddrPort, 0, n)
	}
	for range n {
		f := d.addrPort()
		if d.err != nil {
			return d.err
		}
		out.Flows = append(out.Flows, f)
	}
	switch {
	case d.err != nil:
		return d.err
	case len(d.b) != 0:
		return fmt.Errorf("%w: %d trailing bytes in held list", ErrFormat, len(d.b))
	}
	if err := out.check(); err != nil {
		return err
	}
	*l = out
	return nil
}
