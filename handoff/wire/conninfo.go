package wire

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// TCP options negotiated on a connection, as in tcpi_options
// (include/uapi/linux/tcp.h TCPI_OPT_*).
const (
	OptTimestamps = 1
	OptSACK       = 2
	OptWScale     = 4
)

// Window is struct tcp_repair_window (include/uapi/linux/tcp.h).
type Window struct {
	SndWl1    uint32
	SndWnd    uint32
	MaxWindow uint32
	RcvWnd    uint32
	RcvWup    uint32
}

// ConnInfo is the seed's conn_info: everything a BE needs to rebuild the
// client's TCP connection, plus the bytes still queued on it. The original
// HTTP request travels at the head of RecvQueue.
type ConnInfo struct {
	Client netip.AddrPort
	VIP    netip.AddrPort // local end of the connection
	// SndSeq is the sequence number of the first byte of SendQueue (the
	// oldest unacknowledged byte); RcvSeq that of the first byte of RecvQueue.
	SndSeq, RcvSeq uint32
	MSS            uint16 // mss_clamp
	Options        uint8  // Opt* bits
	SndWScale      uint8
	RcvWScale      uint8
	Timestamp      uint32 // TCP_TIMESTAMP: tcp_time_stamp + tsoffset
	Window         Window
	SendQueue      []byte // sent-unacked bytes followed by Unsent unsent bytes
	Unsent         uint32
	RecvQueue      []byte // received bytes the server has not read yet
}

// ConnMagic is the seed's conn_magic: the next sequence number expected
// from the client.
func (c *ConnInfo) ConnMagic() uint32 { return c.RcvSeq + uint32(len(c.RecvQueue)) }

// MarshalBinary encodes c as a request payload.
func (c *ConnInfo) MarshalBinary() ([]byte, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	b := make([]byte, 0, 96+len(c.SendQueue)+len(c.RecvQueue))
	b = appendAddrPort(b, c.Client)
	b = appendAddrPort(b, c.VIP)
	b = binary.BigEndian.AppendUint32(b, c.SndSeq)
	b = binary.BigEndian.AppendUint32(b, c.RcvSeq)
	b = binary.BigEndian.AppendUint16(b, c.MSS)
	b = append(b, c.Options, c.SndWScale, c.RcvWScale, 0)
	b = binary.BigEndian.AppendUint32(b, c.Timestamp)
	for _, v := range []uint32{c.Window.SndWl1, c.Window.SndWnd, c.Window.MaxWindow, c.Window.RcvWnd, c.Window.RcvWup} {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	b = binary.BigEndian.AppendUint32(b, c.Unsent)
	b = binary.BigEndian.AppendUint32(b, uint32(len(c.SendQueue)))
	b = append(b, c.SendQueue...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(c.RecvQueue)))
	b = append(b, c.RecvQueue...)
	return b, nil
}

// UnmarshalBinary decodes a request payload, rejecting anything malformed.
// The queues alias b.
func (c *ConnInfo) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	var n ConnInfo
	n.Client = d.addrPort()
	n.VIP = d.addrPort()
	n.SndSeq = d.u32()
	n.RcvSeq = d.u32()
	n.MSS = d.u16()
	n.Options, n.SndWScale, n.RcvWScale = d.u8(), d.u8(), d.u8()
	if reserved := d.u8(); reserved != 0 && d.err == nil {
		d.err = fmt.Errorf("%w: reserved byte 0x%02x", ErrFormat, reserved)
	}
	n.Timestamp = d.u32()
	n.Window = Window{d.u32(), d.u32(), d.u32(), d.u32(), d.u32()}
	n.Unsent = d.u32()
	n.SendQueue = d.bytes()
	n.RecvQueue = d.bytes()
	if d.err != nil {
		return d.err
	}
	if len(d.b) != 0 {
		return fmt.Errorf("%w: %d trailing bytes", ErrFormat, len(d.b))
	}
	if err := n.validate(); err != nil {
		return err
	}
	*c = n
	return nil
}

func (c *ConnInfo) validate() error {
	switch {
	case !c.Client.IsValid() || !c.Client.Addr().Is4() || c.Client.Port() == 0:
		return fmt.Errorf("%w: client address %v", ErrFormat, c.Client)
	case !c.VIP.IsValid() || !c.VIP.Addr().Is4() || c.VIP.Port() == 0:
		return fmt.Errorf("%w: VIP address %v", ErrFormat, c.VIP)
	case c.Options&^(OptTimestamps|OptSACK|OptWScale) != 0:
		return fmt.Errorf("%w: unknown option bits 0x%02x", ErrFormat, c.Options)
	case c.SndWScale > 14 || c.RcvWScale > 14: // RFC 7323 section 2.3
		return fmt.Errorf("%w: window scale %d/%d above 14", ErrFormat, c.SndWScale, c.RcvWScale)
	case c.MSS == 0:
		return fmt.Errorf("%w: MSS 0", ErrFormat)
	case int(c.Unsent) > len(c.SendQueue):
		return fmt.Errorf("%w: %d unsent bytes in a %d-byte send queue", ErrFormat, c.Unsent, len(c.SendQueue))
	}
	return nil
}

// addrPortLen is an encoded address: family, IPv4 address, port.
const addrPortLen = 1 + 4 + 2

// IPv4 only for now: one byte of family so IPv6 can follow without a
// version bump. The zero AddrPort encodes as family 0.
func appendAddrPort(b []byte, ap netip.AddrPort) []byte {
	if !ap.Addr().Is4() {
		return append(b, 0, 0, 0, 0, 0, 0, 0)
	}
	a := ap.Addr().As4()
	b = append(b, 4)
	b = append(b, a[:]...)
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.b) < n {
		d.err = fmt.Errorf("%w: truncated (%d bytes left, %d wanted)", ErrFormat, len(d.b), n)
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u8() uint8 {
	if v := d.take(1); v != nil {
		return v[0]
	}
	return 0
}

func (d *decoder) u16() uint16 {
	if v := d.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if v := d.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (d *decoder) addrPort() netip.AddrPort {
	if fam := d.u8(); fam != 4 && d.err == nil {
		d.err = fmt.Errorf("%w: address family %d", ErrFormat, fam)
	}
	v := d.take(4)
	port := d.u16()
	if d.err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(v)), port)
}

// addrPortOrZero is addrPort that also takes family 0, the zero AddrPort.
func (d *decoder) addrPortOrZero() netip.AddrPort {
	if len(d.b) > 0 && d.b[0] == 0 && d.err == nil {
		if z := d.take(addrPortLen); z != nil && string(z) != "\x00\x00\x00\x00\x00\x00\x00" {
			d.err = fmt.Errorf("%w: family-0 address with data", ErrFormat)
		}
		return netip.AddrPort{}
	}
	return d.addrPort()
}

func (d *decoder) bytes() []byte {
	n := d.u32()
	if d.err == nil && n > MaxPayload {
		d.err = fmt.Errorf("%w: queue of %d bytes", ErrFormat, n)
		return nil
	}
	return d.take(int(n))
}
