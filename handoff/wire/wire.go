// Package wire is the handoff protocol spoken on the persistent control
// connections between FE and BE (seed 002, section 4.1), version 1.
//
// Every frame starts with the seed's magic number 0x12968b9 and the
// conn_magic, the next sequence number the connection expects from the
// client, which ties an ACK to its request. docs/protocol.md describes the
// layout byte by byte.
package wire

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Magic identifies a TCPHA handoff frame (seed 4.1: "its value is 0x12968b9").
const Magic uint32 = 0x012968b9

// Version is the protocol version this package speaks.
const Version uint8 = 1

// HeaderLen is the fixed frame header: magic, version, type, flags, reserved,
// conn_magic, payload length.
const HeaderLen = 16

// MACLen is the length of the HMAC-SHA256 trailer of a frame.
const MACLen = sha256.Size

// MaxPayload bounds a frame so a peer cannot make the reader allocate at will.
// A handoff carries one request head (bounded by maxheader) and at most two
// socket queues of a connection.
const MaxPayload = 8 << 20

// Type is the kind of a frame.
type Type uint8

const (
	TypeRequest Type = 1 // FE→BE: migrate this connection (ConnInfo payload)
	TypeAck     Type = 2 // BE→FE: the handoff result (Ack payload)
	TypeCommit  Type = 3 // FE→BE: forwarding switched, start serving
	TypeAbort   Type = 4 // FE→BE: forget the restored connection silently
	TypePing    Type = 5 // FE→BE: detection (seed 4.9)
	TypePong    Type = 6 // BE→FE: detection answer
)

func (t Type) String() string {
	switch t {
	case TypeRequest:
		return "request"
	case TypeAck:
		return "ack"
	case TypeCommit:
		return "commit"
	case TypeAbort:
		return "abort"
	case TypePing:
		return "ping"
	case TypePong:
		return "pong"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

const flagMAC = 1

// Frame is one control message.
type Frame struct {
	Type      Type
	ConnMagic uint32
	Payload   []byte
}

// Decoding errors; a reader that gets one closes the control connection.
var (
	ErrMagic   = errors.New("not a tcpha frame (bad magic)")
	ErrVersion = errors.New("unsupported protocol version")
	ErrBadMAC  = errors.New("frame authentication failed")
	ErrTooBig  = errors.New("frame too large")
	ErrFormat  = errors.New("malformed payload")
)

// Codec reads and writes frames, authenticating them when Secret is set.
type Codec struct {
	Secret []byte
}

// Append encodes f onto b.
func (c Codec) Append(b []byte, f Frame) ([]byte, error) {
	if len(f.Payload) > MaxPayload {
		return b, fmt.Errorf("encode %s: %w: %d bytes", f.Type, ErrTooBig, len(f.Payload))
	}
	start := len(b)
	var flags uint8
	if len(c.Secret) > 0 {
		flags |= flagMAC
	}
	b = binary.BigEndian.AppendUint32(b, Magic)
	b = append(b, Version, uint8(f.Type), flags, 0)
	b = binary.BigEndian.AppendUint32(b, f.ConnMagic)
	b = binary.BigEndian.AppendUint32(b, uint32(len(f.Payload)))
	b = append(b, f.Payload...)
	if flags&flagMAC != 0 {
		m := hmac.New(sha256.New, c.Secret)
		m.Write(b[start:])
		b = m.Sum(b)
	}
	return b, nil
}

// Write sends one frame in a single write.
func (c Codec) Write(w io.Writer, f Frame) error {
	b, err := c.Append(nil, f)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// Read reads one frame. io.EOF means the peer closed between frames.
func (c Codec) Read(r io.Reader) (Frame, error) {
	var h [HeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Frame{}, err
	}
	if m := binary.BigEndian.Uint32(h[0:]); m != Magic {
		return Frame{}, fmt.Errorf("%w: 0x%08x", ErrMagic, m)
	}
	if h[4] != Version {
		return Frame{}, fmt.Errorf("%w: %d (this agent speaks %d)", ErrVersion, h[4], Version)
	}
	f := Frame{Type: Type(h[5]), ConnMagic: binary.BigEndian.Uint32(h[8:])}
	flags := h[6]
	n := binary.BigEndian.Uint32(h[12:])
	if n > MaxPayload {
		return Frame{}, fmt.Errorf("%w: %d bytes", ErrTooBig, n)
	}
	body := make([]byte, int(n))
	if _, err := io.ReadFull(r, body); err != nil {
		return Frame{}, fmt.Errorf("read %s payload: %w", f.Type, noEOF(err))
	}
	hasMAC := flags&flagMAC != 0
	if hasMAC != (len(c.Secret) > 0) {
		if hasMAC {
			return Frame{}, fmt.Errorf("%w: peer signs frames but no secret is configured here", ErrBadMAC)
		}
		return Frame{}, fmt.Errorf("%w: unsigned frame but a secret is configured", ErrBadMAC)
	}
	if hasMAC {
		var sum [MACLen]byte
		if _, err := io.ReadFull(r, sum[:]); err != nil {
			return Frame{}, fmt.Errorf("read %s MAC: %w", f.Type, noEOF(err))
		}
		m := hmac.New(sha256.New, c.Secret)
		m.Write(h[:])
		m.Write(body)
		if !hmac.Equal(m.Sum(nil), sum[:]) {
			return Frame{}, fmt.Errorf("%w: %s frame", ErrBadMAC, f.Type)
		}
	}
	f.Payload = body
	return f, nil
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
