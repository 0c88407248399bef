// Package wire is the handoff protocol spoken on the control sessions
// between FEs and BEs (seed 002, section 4.1), version 2.
//
// Every frame starts with the seed's magic number 0x12968b9. Version 2 adds
// a per-session id to the header, so that many handoffs share one session
// (the seed's conn_magic alone is not unique across clients), and a
// handshake that authenticates both ends and keys every later frame with a
// per-direction sequence number, so a recorded frame cannot be replayed.
// docs/protocol.md describes the layout byte by byte.
package wire

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
)

// Magic identifies a TCPHA handoff frame (seed 4.1: "its value is 0x12968b9").
const Magic uint32 = 0x012968b9

// Version is the protocol version this package speaks.
const Version uint8 = 2

// HeaderLen is the fixed frame header: magic, version, type, flags,
// reserved, id, conn_magic, payload length.
const HeaderLen = 24

// MACLen is the length of a frame's MAC: HMAC-SHA256 truncated to 128 bits
// (RFC 2104 section 5 allows truncation to half the hash length).
const MACLen = 16

// MaxPayload bounds a frame of an authenticated session. A handoff carries
// one request head (bounded by maxheader) and a connection's receive queue,
// bounded by its receive buffer.
const MaxPayload = 8 << 20

// MaxHandshakePayload bounds the frames read before a peer is
// authenticated: nothing larger than a small header is allocated for a
// stranger.
const MaxHandshakePayload = 128

// Type is the kind of a frame.
type Type uint8

const (
	TypeOffer       Type = 1  // migrate this connection (ConnInfo); answered by an Ack
	TypeAck         Type = 2  // the answer to a request (Ack payload)
	TypeCommit      Type = 3  // forwarding switched: start serving (Flow payload)
	TypeAbort       Type = 4  // forget the rebuilt connection silently (Flow payload)
	TypeProbe       Type = 5  // detection (seed 4.9) and session keepalive
	TypeProbeReply  Type = 6  // the BE's health (Health payload)
	TypeHello       Type = 7  // handshake: role, nonce, addresses (Hello payload)
	TypeAuth        Type = 8  // handshake: proof of the cluster key (32 bytes)
	TypeMigrate     Type = 9  // BE→FE: move this connection to the BE its next request belongs to (ConnInfo); answered by an Ack
	TypeCluster     Type = 10 // FE→BE: the rules and the BE list (Cluster payload); answered by an Ack
	TypeRegister    Type = 11 // BE→FE: dynamic registration (Register payload); answered by an Ack
	TypeDeregister  Type = 12 // BE→FE: the BE leaves; answered by an Ack
	TypeGoAway      Type = 13 // no new requests on this session; it closes when idle
	TypeReset       Type = 14 // FE→BE: reset this served connection, the FE leaves it (Flow payload); answered by an Ack
	TypeHeld        Type = 15 // FE→BE: which client connections do you hold? (HeldAsk payload); answered by a HeldList
	TypeHeldList    Type = 16 // BE→FE: one page of the answer (HeldList payload)
	TypeStats       Type = 17 // FE→BE: your relay's counters? (no payload); answered by a StatsReply, or by an older BE with an Ack
	TypeStatsReply  Type = 18 // BE→FE: the relay's counters (RelayStats payload)
	TypeSync        Type = 19 // FE→FE: a batch of flow-state changes (SyncBatch payload); answered by an Ack once applied
	TypeSwitch      Type = 20 // BE→FE: forward this flow to another BE, which holds it rebuilt (Switch payload); answered by an Ack
	typeSentinel    Type = 21
	typeUnknownName      = "type(%d)"
)

var typeNames = [...]string{"", "offer", "ack", "commit", "abort", "probe", "probe-reply", "hello", "auth",
	"migrate", "cluster", "register", "deregister", "goaway", "reset", "held", "held-list", "stats", "stats-reply", "sync", "switch"}

// Answered tells whether a frame of type t is a request its receiver
// answers (Session.Reply).
func (t Type) Answered() bool {
	switch t {
	case TypeOffer, TypeMigrate, TypeCluster, TypeRegister, TypeDeregister, TypeReset, TypeHeld,
		TypeStats, TypeSync, TypeSwitch:
		return true
	}
	return false
}

func (t Type) String() string {
	if t > 0 && t < typeSentinel {
		return typeNames[t]
	}
	return fmt.Sprintf(typeUnknownName, uint8(t))
}

// flagMAC says a MAC follows the payload.
const flagMAC = 1

// Frame is one control message.
type Frame struct {
	Type Type
	// ID ties the frames of one exchange together within a session: a
	// request, its answer and its follow-ups (commit, abort).
	ID        uint64
	ConnMagic uint32 // the seed's conn_magic for handoff frames, else 0
	Payload   []byte
}

// Decoding errors; a reader that gets one closes the session.
var (
	ErrMagic   = errors.New("not a tcpha frame (bad magic)")
	ErrVersion = errors.New("unsupported protocol version")
	ErrBadMAC  = errors.New("frame authentication failed")
	ErrTooBig  = errors.New("frame too large")
	ErrFormat  = errors.New("malformed payload")
)

// Header is a decoded frame header.
type Header struct {
	Type      Type
	MAC       bool
	ID        uint64
	ConnMagic uint32
	Length    uint32
}

// ParseHeader decodes and checks a frame header; max bounds the payload
// length (MaxHandshakePayload before authentication, MaxPayload after).
func ParseHeader(h []byte, max uint32) (Header, error) {
	if len(h) < HeaderLen {
		return Header{}, fmt.Errorf("%w: %d-byte header", ErrFormat, len(h))
	}
	if m := binary.BigEndian.Uint32(h[0:]); m != Magic {
		return Header{}, fmt.Errorf("%w: 0x%08x", ErrMagic, m)
	}
	if h[4] != Version {
		return Header{}, fmt.Errorf("%w: %d (this agent speaks %d)", ErrVersion, h[4], Version)
	}
	if h[6]&^flagMAC != 0 || h[7] != 0 {
		return Header{}, fmt.Errorf("%w: flags 0x%02x, reserved 0x%02x", ErrFormat, h[6], h[7])
	}
	hd := Header{
		Type:      Type(h[5]),
		MAC:       h[6]&flagMAC != 0,
		ID:        binary.BigEndian.Uint64(h[8:]),
		ConnMagic: binary.BigEndian.Uint32(h[16:]),
		Length:    binary.BigEndian.Uint32(h[20:]),
	}
	if hd.Length > max {
		return Header{}, fmt.Errorf("%w: %s of %d bytes (limit %d)", ErrTooBig, hd.Type, hd.Length, max)
	}
	return hd, nil
}

func appendHeader(b []byte, f Frame, mac bool) []byte {
	var flags uint8
	if mac {
		flags = flagMAC
	}
	b = binary.BigEndian.AppendUint32(b, Magic)
	b = append(b, Version, uint8(f.Type), flags, 0)
	b = binary.BigEndian.AppendUint64(b, f.ID)
	b = binary.BigEndian.AppendUint32(b, f.ConnMagic)
	return binary.BigEndian.AppendUint32(b, uint32(len(f.Payload)))
}

// Keyed authenticates one direction of a session: each frame's MAC covers
// its sequence number in that direction, its header and its payload, so a
// frame replayed, reordered, dropped or moved to another session fails.
// A nil *Keyed (no cluster secret) sends and expects no MAC. It is owned by
// one goroutine: the session's writer, or its reader.
type Keyed struct {
	mac hash.Hash
	seq uint64
	sum [sha256.Size]byte
}

// NewKeyed returns the MAC state for one direction with key.
func NewKeyed(key []byte) *Keyed { return &Keyed{mac: hmac.New(sha256.New, key)} }

// compute returns the MAC of the next frame in this direction, made of
// parts, and advances the sequence number.
func (k *Keyed) compute(parts ...[]byte) []byte {
	k.mac.Reset()
	var seq [8]byte
	binary.BigEndian.PutUint64(seq[:], k.seq)
	k.seq++
	k.mac.Write(seq[:])
	for _, p := range parts {
		k.mac.Write(p)
	}
	return k.mac.Sum(k.sum[:0])[:MACLen]
}

func (k *Keyed) verify(header, payload []byte) []byte { return k.compute(header, payload) }

// AppendFrame encodes f onto b, with its MAC when k is not nil.
func AppendFrame(b []byte, f Frame, k *Keyed) ([]byte, error) {
	if len(f.Payload) > MaxPayload {
		return b, fmt.Errorf("encode %s: %w: %d bytes", f.Type, ErrTooBig, len(f.Payload))
	}
	start := len(b)
	b = appendHeader(b, f, k != nil)
	b = append(b, f.Payload...)
	if k != nil {
		b = append(b, k.compute(b[start:])...)
	}
	return b, nil
}

// Reader reads frames from one direction of a session. A payload grows
// only as its bytes arrive, so a header that claims a large payload costs
// nothing until the payload is really sent.
type Reader struct {
	R   io.Reader
	Key *Keyed // nil: no MAC expected
	Max uint32 // payload bound; 0 means MaxPayload
}

// readChunk is how much of a payload is allocated ahead of its bytes.
const readChunk = 64 << 10

// Read reads one frame. io.EOF means the peer closed between frames. The
// frame's payload belongs to the caller.
func (r *Reader) Read() (Frame, error) {
	max := r.Max
	if max == 0 {
		max = MaxPayload
	}
	var h [HeaderLen]byte
	if _, err := io.ReadFull(r.R, h[:]); err != nil {
		return Frame{}, err
	}
	hd, err := ParseHeader(h[:], max)
	if err != nil {
		return Frame{}, err
	}
	if hd.MAC != (r.Key != nil) {
		if hd.MAC {
			return Frame{}, fmt.Errorf("%w: peer signs frames but this session has no key", ErrBadMAC)
		}
		return Frame{}, fmt.Errorf("%w: unsigned %s frame on an authenticated session", ErrBadMAC, hd.Type)
	}
	n := int(hd.Length)
	payload := make([]byte, 0, min(n, readChunk))
	for len(payload) < n {
		chunk := min(n-len(payload), readChunk)
		payload = slices.Grow(payload, chunk)
		m, err := io.ReadFull(r.R, payload[len(payload):len(payload)+chunk])
		payload = payload[:len(payload)+m]
		if err != nil {
			return Frame{}, fmt.Errorf("read %s payload: %w", hd.Type, noEOF(err))
		}
	}
	if r.Key != nil {
		var sum [MACLen]byte
		if _, err := io.ReadFull(r.R, sum[:]); err != nil {
			return Frame{}, fmt.Errorf("read %s MAC: %w", hd.Type, noEOF(err))
		}
		if !hmac.Equal(r.Key.verify(h[:], payload), sum[:]) {
			return Frame{}, fmt.Errorf("%w: %s frame (replayed, reordered or forged)", ErrBadMAC, hd.Type)
		}
	}
	return Frame{Type: hd.Type, ID: hd.ID, ConnMagic: hd.ConnMagic, Payload: payload}, nil
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
