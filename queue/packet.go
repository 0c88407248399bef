// Package queue is the agent's slow path: the few packets whose arrival
// changes a connection's state reach it through NFQUEUE. Everything else
// stays in the kernel (nft sets and maps), because one NFQUEUE reader
// verdicts only about 20-26 k packets/s (FACTS.md).
//
// The decisions are pure: bytes in, a verdict out (Observer). The
// go-nfqueue reader (queue_linux.go) is a short shim around them.
package queue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// Packet is what the agent needs from an IPv4/TCP packet.
type Packet struct {
	Src, Dst           netip.AddrPort
	SYN, FIN, RST, ACK bool
	Payload            int // TCP payload bytes
}

// ErrMalformed is returned for bytes that are not a whole IPv4/TCP packet.
var ErrMalformed = errors.New("malformed packet")

// Parse decodes an IPv4 packet carrying TCP, as NFQUEUE delivers it
// (from the IP header on).
func Parse(b []byte) (Packet, error) {
	s, err := ParseSegment(b)
	return s.Packet, err
}

// Segment is a packet with what the BE's packet path needs besides: its
// sequence number and its payload (a slice of the packet).
type Segment struct {
	Packet
	Seq  uint32
	Data []byte
	// ihl and off are where the TCP header and the payload start.
	ihl, off int
}

// ParseSegment decodes an IPv4/TCP packet with its sequence number and
// payload.
func ParseSegment(b []byte) (Segment, error) {
	if len(b) < 20 {
		return Segment{}, fmt.Errorf("%w: %d bytes", ErrMalformed, len(b))
	}
	if v := b[0] >> 4; v != 4 {
		return Segment{}, fmt.Errorf("%w: IP version %d", ErrMalformed, v)
	}
	ihl := int(b[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(b[2:]))
	switch {
	case ihl < 20 || total < ihl || total > len(b):
		return Segment{}, fmt.Errorf("%w: header %d, total %d, have %d bytes", ErrMalformed, ihl, total, len(b))
	case b[9] != 6:
		return Segment{}, fmt.Errorf("%w: protocol %d, not TCP", ErrMalformed, b[9])
	case binary.BigEndian.Uint16(b[6:])&0x1fff != 0:
		return Segment{}, fmt.Errorf("%w: a non-first fragment", ErrMalformed)
	}
	tcp := b[ihl:total]
	if len(tcp) < 20 {
		return Segment{}, fmt.Errorf("%w: TCP header of %d bytes", ErrMalformed, len(tcp))
	}
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return Segment{}, fmt.Errorf("%w: TCP data offset %d in %d bytes", ErrMalformed, off, len(tcp))
	}
	flags := tcp[13]
	return Segment{Seq: binary.BigEndian.Uint32(tcp[4:]), Data: tcp[off:], ihl: ihl, off: ihl + off, Packet: Packet{
		Src:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[12:16])), binary.BigEndian.Uint16(tcp[0:])),
		Dst:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[16:20])), binary.BigEndian.Uint16(tcp[2:])),
		FIN:     flags&0x01 != 0,
		SYN:     flags&0x02 != 0,
		RST:     flags&0x04 != 0,
		ACK:     flags&0x10 != 0,
		Payload: len(tcp) - off,
	}}, nil
}

// Truncate returns a copy of the segment's packet that carries only its
// first keep payload bytes, with the IP total length and both checksums
// computed again, and without FIN: a FIN sits after the last payload byte,
// so it goes with the bytes cut off, which the client sends again. The
// kernel takes a packet an NFQUEUE verdict replaced as it is
// (nfqnl_mangle sets CHECKSUM_NONE), so the checksums must be whole.
func (s Segment) Truncate(b []byte, keep int) ([]byte, error) {
	if keep < 0 || keep > len(s.Data) || s.off+len(s.Data) > len(b) || s.ihl < 20 {
		return nil, fmt.Errorf("%w: keep %d of a %d-byte payload", ErrMalformed, keep, len(s.Data))
	}
	out := append([]byte(nil), b[:s.off+keep]...)
	binary.BigEndian.PutUint16(out[2:], uint16(len(out)))
	out[10], out[11] = 0, 0
	binary.BigEndian.PutUint16(out[10:], checksum(out[:s.ihl], 0))
	tcp := out[s.ihl:]
	tcp[13] &^= 0x01 // FIN
	tcp[16], tcp[17] = 0, 0
	// The pseudo-header (RFC 9293 section 3.1): source, destination,
	// zero, protocol, TCP length.
	var sum uint32
	for i := 12; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(out[i:]))
	}
	sum += 6 + uint32(len(tcp))
	binary.BigEndian.PutUint16(tcp[16:], checksum(tcp, sum))
	return out, nil
}

// checksum is the Internet checksum (RFC 1071) of b, starting from sum.
func checksum(b []byte, sum uint32) uint16 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
