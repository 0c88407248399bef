package wire

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Result is the seed's handoff ACK 'msg': how a request ended at its
// receiver. Each is a stable log and metric label.
type Result uint8

const (
	ResultOK       Result = 0
	ResultBusy     Result = 1 // maxclients handoffs already in progress
	ResultRestore  Result = 2 // the BE could not rebuild the socket
	ResultBadFrame Result = 3 // the request did not decode
	ResultUpstream Result = 4 // the local web server is unreachable
	ResultWrongVIP Result = 5 // the connection is not for this BE's VIP and port
	ResultInvalid  Result = 6 // the handoff fails validation (client address, queues)
	ResultDraining Result = 7 // the receiver is stopping
	ResultUnknown  Result = 8 // migrate, reset: no such flow (the FE does not forward it to that BE; the BE does not serve it)
	ResultStay     Result = 9 // migrate: the request belongs to the BE that asked; it serves it
	resultSentinel Result = 10

	maxReasonLength = 512
)

func (r Result) String() string {
	switch r {
	case ResultOK:
		return "ok"
	case ResultBusy:
		return "busy"
	case ResultRestore:
		return "restore-failed"
	case ResultBadFrame:
		return "bad-request"
	case ResultUpstream:
		return "upstream-down"
	case ResultWrongVIP:
		return "wrong-vip"
	case ResultInvalid:
		return "invalid"
	case ResultDraining:
		return "draining"
	case ResultUnknown:
		return "unknown-flow"
	case ResultStay:
		return "stay"
	}
	return fmt.Sprintf("result(%d)", uint8(r))
}

// Ack is the payload of an Ack frame.
type Ack struct {
	Result Result
	Reason string // for the FE's log; empty on success
}

// MarshalBinary encodes the ACK payload.
func (a Ack) MarshalBinary() ([]byte, error) {
	r := a.Reason
	if len(r) > maxReasonLength {
		r = r[:maxReasonLength]
	}
	b := []byte{byte(a.Result)}
	b = binary.BigEndian.AppendUint16(b, uint16(len(r)))
	return append(b, r...), nil
}

// UnmarshalBinary decodes an ACK payload.
func (a *Ack) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	res := Result(d.u8())
	n := d.u16()
	if d.err == nil && n > maxReasonLength {
		return fmt.Errorf("%w: reason of %d bytes", ErrFormat, n)
	}
	reason := d.take(int(n))
	switch {
	case d.err != nil:
		return d.err
	case len(d.b) != 0:
		return fmt.Errorf("%w: %d trailing bytes", ErrFormat, len(d.b))
	case res >= resultSentinel:
		return fmt.Errorf("%w: unknown result %d", ErrFormat, res)
	}
	*a = Ack{Result: res, Reason: string(reason)}
	return nil
}

// Flow names a client connection: the payload of Commit and Abort, which
// the BE matches against the handoff it holds for that client, whichever of
// the FE's sessions carries them.
type Flow struct{ Client netip.AddrPort }

// MarshalBinary encodes the Flow payload.
func (f Flow) MarshalBinary() ([]byte, error) {
	if !f.Client.Addr().Is4() {
		return nil, fmt.Errorf("%w: flow client %v", ErrFormat, f.Client)
	}
	return appendAddrPort(make([]byte, 0, addrPortLen), f.Client), nil
}

// UnmarshalBinary decodes a Flow payload.
func (f *Flow) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	c := d.addrPort()
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%w: %d trailing bytes in flow", ErrFormat, len(d.b))
	}
	if d.err != nil {
		return d.err
	}
	f.Client = c
	return nil
}

// Health is the payload of a ProbeReply: the BE's answer to detection
// (seed 4.9, with the load feedback the seed planned for its next release).
type Health struct {
	// ServerUp says the BE's own web server answered the BE's last check.
	ServerUp bool
	// Draining says the BE is stopping and takes no new connections.
	Draining bool
	// Active is how many client connections the BE serves now.
	Active uint32
}

const (
	healthServerUp = 1
	healthDraining = 2
)

// MarshalBinary encodes the Health payload.
func (h Health) MarshalBinary() ([]byte, error) {
	var flags byte
	if h.ServerUp {
		flags |= healthServerUp
	}
	if h.Draining {
		flags |= healthDraining
	}
	return binary.BigEndian.AppendUint32([]byte{flags}, h.Active), nil
}

// UnmarshalBinary decodes a Health payload.
func (h *Health) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	flags := d.u8()
	active := d.u32()
	switch {
	case d.err != nil:
		return d.err
	case len(d.b) != 0:
		return fmt.Errorf("%w: %d trailing bytes in health", ErrFormat, len(d.b))
	case flags&^(healthServerUp|healthDraining) != 0:
		return fmt.Errorf("%w: health flags 0x%02x", ErrFormat, flags)
	}
	*h = Health{ServerUp: flags&healthServerUp != 0, Draining: flags&healthDraining != 0, Active: active}
	return nil
}

// Switch is the payload of a Switch frame (a BE-to-BE move, seed 4.8.2):
// the BE holding Client's connection has had it rebuilt on To and asks the
// FE to forward the flow there from now on.
type Switch struct {
	Client netip.AddrPort
	To     netip.Addr
}

// MarshalBinary encodes the Switch payload.
func (s Switch) MarshalBinary() ([]byte, error) {
	if !s.Client.Addr().Is4() || !s.To.Is4() {
		return nil, fmt.Errorf("%w: switch %v to %v", ErrFormat, s.Client, s.To)
	}
	b := appendAddrPort(make([]byte, 0, 2*addrPortLen), s.Client)
	return appendAddrPort(b, netip.AddrPortFrom(s.To, 0)), nil
}

// UnmarshalBinary decodes a Switch payload.
func (s *Switch) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	c, to := d.addrPort(), d.addrPort()
	switch {
	case d.err != nil:
		return d.err
	case len(d.b) != 0:
		return fmt.Errorf("%w: %d trailing bytes in switch", ErrFormat, len(d.b))
	case !c.IsValid() || !to.Addr().IsValid() || to.Port() != 0:
		return fmt.Errorf("%w: switch %v to %v", ErrFormat, c, to)
	}
	*s = Switch{Client: c, To: to.Addr()}
	return nil
}
