package wire

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"
)

// Flow-state sync between two FEs (issue 17, `[fe] syncpeer`): the FE that
// holds the VIP streams its forward map's changes to the other in Sync
// frames, each answered by an Ack once applied, so that the standby's
// kernel already forwards every handed-off flow when VRRP moves the VIP.
// A batch names each flow at most once, with the state the peer should
// now hold for it; a full resync is a run of batches from one flagged
// SyncBegin to one flagged SyncEnd, after which the receiver drops every
// flow the resync did not name.

// SyncKind is what a sync event says of a flow.
type SyncKind uint8

const (
	// SyncForward: the flow is HANDOFFED to BE (its forward element was
	// added, or replaced by a move or a new connection on the port).
	SyncForward SyncKind = 1
	// SyncTimeWait: the flow saw its FIN or RST; its forwarding to BE is
	// kept for Left more (TIME_WAIT).
	SyncTimeWait SyncKind = 2
	// SyncRemove: the flow's forwarding ended.
	SyncRemove SyncKind = 3
	// A flow pinned by the kernel's own packet path ([fe] accept = be)
	// to a BE other than its slot's goes as SyncForward (fe.syncPins);
	// the slot map would need a frame of its own (docs/design.md,
	// "Flow-state sync": designed, not built).
	syncKindSentinel SyncKind = 4
)

func (k SyncKind) String() string {
	switch k {
	case SyncForward:
		return "forward"
	case SyncTimeWait:
		return "time-wait"
	case SyncRemove:
		return "remove"
	}
	return fmt.Sprintf("sync-kind(%d)", uint8(k))
}

// Sync batch flags.
const (
	SyncBegin = 1 // the first batch of a full resync
	SyncEnd   = 2 // the last batch of a full resync
)

// MaxSyncEvents bounds one Sync frame: 4,096 events of 17 bytes, 68 KiB.
const MaxSyncEvents = 4096

// MaxSyncLeft bounds a TIME_WAIT's remaining time: [fe] timewait is at
// most a year in the config, but no FE keeps a closed flow for a day.
const MaxSyncLeft = 24 * time.Hour

// syncEventLen is one encoded event: kind, flow, BE (family and IPv4
// address), remaining milliseconds.
const syncEventLen = 1 + addrPortLen + 5 + 4

// SyncEvent is one flow's new state.
type SyncEvent struct {
	Kind SyncKind
	Flow netip.AddrPort // the client's address and port
	BE   netip.Addr     // SyncForward and SyncTimeWait; zero for SyncRemove
	Left time.Duration  // SyncTimeWait: TIME_WAIT left, in milliseconds on the wire
}

// SyncBatch is the payload of a Sync frame.
type SyncBatch struct {
	Flags  uint8
	Events []SyncEvent
}

// MarshalBinary encodes the batch: flags, a 2-byte count, then each event
// as kind, flow (family, address, port), BE (family, address; family 0
// and zeros for none) and 4 bytes of remaining milliseconds.
func (s SyncBatch) MarshalBinary() ([]byte, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, 3+len(s.Events)*syncEventLen)
	b = append(b, s.Flags)
	b = binary.BigEndian.AppendUint16(b, uint16(len(s.Events)))
	for _, e := range s.Events {
		b = append(b, uint8(e.Kind))
		b = appendAddrPort(b, e.Flow)
		if e.BE.Is4() {
			a := e.BE.As4()
			b = append(b, 4)
			b = append(b, a[:]...)
		} else {
			b = append(b, 0, 0, 0, 0, 0)
		}
		b = binary.BigEndian.AppendUint32(b, uint32(e.Left/time.Millisecond))
	}
	return b, nil
}

// check holds what the receiver relies on: bounded, known flags and kinds,
// IPv4 flows with a port, a BE exactly where the kind has one, a bounded
// TIME_WAIT only on its kind, and each flow at most once (the receiver
// applies a batch's events in parallel).
func (s SyncBatch) check() error {
	if len(s.Events) > MaxSyncEvents {
		return fmt.Errorf("%w: %d sync events (limit %d)", ErrFormat, len(s.Events), MaxSyncEvents)
	}
	if s.Flags&^(SyncBegin|SyncEnd) != 0 {
		return fmt.Errorf("%w: sync flags 0x%02x", ErrFormat, s.Flags)
	}
	seen := make(map[netip.AddrPort]struct{}, len(s.Events))
	for _, e := range s.Events {
		switch {
		case e.Kind == 0 || e.Kind >= syncKindSentinel:
			return fmt.Errorf("%w: %v", ErrFormat, e.Kind)
		case !e.Flow.Addr().Is4() || e.Flow.Port() == 0:
			return fmt.Errorf("%w: sync flow %v", ErrFormat, e.Flow)
		case (e.Kind == SyncRemove) == e.BE.IsValid():
			return fmt.Errorf("%w: %v of %v with BE %v", ErrFormat, e.Kind, e.Flow, e.BE)
		case e.BE.IsValid() && (!e.BE.Is4() || e.BE.IsUnspecified()):
			return fmt.Errorf("%w: sync BE %v", ErrFormat, e.BE)
		case e.Left < 0 || e.Left > MaxSyncLeft || (e.Kind != SyncTimeWait && e.Left != 0):
			return fmt.Errorf("%w: %v of %v with %v left", ErrFormat, e.Kind, e.Flow, e.Left)
		case e.Left%time.Millisecond != 0:
			return fmt.Errorf("%w: %v left is not whole milliseconds", ErrFormat, e.Left)
		}
		if _, dup := seen[e.Flow]; dup {
			return fmt.Errorf("%w: sync flow %v twice in one batch", ErrFormat, e.Flow)
		}
		seen[e.Flow] = struct{}{}
	}
	return nil
}

// UnmarshalBinary decodes a Sync payload.
func (s *SyncBatch) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	flags := d.u8()
	n := d.u16()
	if d.err == nil && int(n) > MaxSyncEvents {
		return fmt.Errorf("%w: %d sync events (limit %d)", ErrFormat, n, MaxSyncEvents)
	}
	if d.err == nil && len(d.b) != int(n)*syncEventLen {
		return fmt.Errorf("%w: %d sync events in %d bytes", ErrFormat, n, len(d.b))
	}
	out := SyncBatch{Flags: flags}
	if d.err == nil {
		out.Events = make([]SyncEvent, 0, n)
	}
	for range n {
		var e SyncEvent
		e.Kind = SyncKind(d.u8())
		e.Flow = d.addrPort()
		switch fam := d.u8(); {
		case d.err != nil:
		case fam == 4:
			if v := d.take(4); v != nil {
				e.BE = netip.AddrFrom4([4]byte(v))
			}
		case fam == 0:
			if z := d.take(4); z != nil && string(z) != "\x00\x00\x00\x00" {
				d.err = fmt.Errorf("%w: family-0 BE with data", ErrFormat)
			}
		default:
			d.err = fmt.Errorf("%w: BE address family %d", ErrFormat, fam)
		}
		e.Left = time.Duration(d.u32()) * time.Millisecond
		if d.err != nil {
			return d.err
		}
		out.Events = append(out.Events, e)
	}
	if d.err != nil {
		return d.err
	}
	if err := out.check(); err != nil {
		return err
	}
	*s = out
	return nil
}
