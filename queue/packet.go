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
	if len(b) < 20 {
		return Packet{}, fmt.Errorf("%w: %d bytes", ErrMalformed, len(b))
	}
	if v := b[0] >> 4; v != 4 {
		return Packet{}, fmt.Errorf("%w: IP version %d", ErrMalformed, v)
	}
	ihl := int(b[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(b[2:]))
	switch {
	case ihl < 20 || total < ihl || total > len(b):
		return Packet{}, fmt.Errorf("%w: header %d, total %d, have %d bytes", ErrMalformed, ihl, total, len(b))
	case b[9] != 6:
		return Packet{}, fmt.Errorf("%w: protocol %d, not TCP", ErrMalformed, b[9])
	case binary.BigEndian.Uint16(b[6:])&0x1fff != 0:
		return Packet{}, fmt.Errorf("%w: a non-first fragment", ErrMalformed)
	}
	tcp := b[ihl:total]
	if len(tcp) < 20 {
		return Packet{}, fmt.Errorf("%w: TCP header of %d bytes", ErrMalformed, len(tcp))
	}
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return Packet{}, fmt.Errorf("%w: TCP data offset %d in %d bytes", ErrMalformed, off, len(tcp))
	}
	flags := tcp[13]
	return Packet{
		Src:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[12:16])), binary.BigEndian.Uint16(tcp[0:])),
		Dst:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[16:20])), binary.BigEndian.Uint16(tcp[2:])),
		FIN:     flags&0x01 != 0,
		SYN:     flags&0x02 != 0,
		RST:     flags&0x04 != 0,
		ACK:     flags&0x10 != 0,
		Payload: len(tcp) - off,
	}, nil
}
