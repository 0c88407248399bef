package wire

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Role is what a session's end is in the cluster.
type Role uint8

const (
	RoleFE Role = 1
	RoleBE Role = 2
)

func (r Role) String() string {
	switch r {
	case RoleFE:
		return "FE"
	case RoleBE:
		return "BE"
	}
	return fmt.Sprintf("role(%d)", uint8(r))
}

// NonceLen is the length of each side's handshake nonce.
const NonceLen = 32

// ProofLen is the length of an Auth frame's payload.
const ProofLen = sha256.Size

// Hello opens a session: the dialer sends one, the acceptor answers with
// its own. Both nonces go into every key of the session, so a session
// recorded once cannot be replayed: the other side's nonce differs.
type Hello struct {
	Role Role
	// Keyed says this end holds a cluster secret and expects Auth frames
	// and MACs. Both ends must agree.
	Keyed bool
	Nonce [NonceLen]byte
	// Addr is the sender's real address and control port (an FE's port
	// is 0: it does not listen for sessions from BEs).
	Addr netip.AddrPort
	// VIP is the cluster's virtual address; an FE adds the VIP's port,
	// which a BE then accepts handoffs for.
	VIP netip.AddrPort
	// TLSPort is an FE's second VIP port, for TLS (issue 16), which a BE
	// accepts handoffs for too; 0: none. It takes the two bytes that were
	// reserved, so an FE without TLS still speaks to a BE that predates it;
	// a BE's hello carries 0.
	TLSPort uint16
}

const helloKeyed = 1

// helloLen is the Hello payload's size: role, flags, TLS port, nonce, two
// addresses.
const helloLen = 4 + NonceLen + 2*addrPortLen

// MarshalBinary encodes the Hello payload.
func (h *Hello) MarshalBinary() ([]byte, error) {
	if h.Role != RoleFE && h.Role != RoleBE {
		return nil, fmt.Errorf("%w: hello role %d", ErrFormat, h.Role)
	}
	b := make([]byte, 0, helloLen)
	var flags byte
	if h.Keyed {
		flags = helloKeyed
	}
	b = append(b, byte(h.Role), flags)
	b = binary.BigEndian.AppendUint16(b, h.TLSPort)
	b = append(b, h.Nonce[:]...)
	b = appendAddrPort(b, h.Addr)
	return appendAddrPort(b, h.VIP), nil
}

// UnmarshalBinary decodes a Hello payload.
func (h *Hello) UnmarshalBinary(b []byte) error {
	d := decoder{b: b}
	var n Hello
	n.Role = Role(d.u8())
	flags := d.u8()
	n.TLSPort = d.u16()
	copy(n.Nonce[:], d.take(NonceLen))
	n.Addr = d.addrPortOrZero()
	n.VIP = d.addrPortOrZero()
	switch {
	case d.err != nil:
		return d.err
	case len(d.b) != 0:
		return fmt.Errorf("%w: %d trailing bytes in hello", ErrFormat, len(d.b))
	case n.Role != RoleFE && n.Role != RoleBE:
		return fmt.Errorf("%w: hello role %d", ErrFormat, n.Role)
	case n.Role == RoleBE && n.TLSPort != 0:
		return fmt.Errorf("%w: a BE's hello names TLS port %d", ErrFormat, n.TLSPort)
	case flags&^helloKeyed != 0:
		return fmt.Errorf("%w: hello flags 0x%02x", ErrFormat, flags)
	}
	n.Keyed = flags&helloKeyed != 0
	*h = n
	return nil
}

// Transcript binds a session to both Hello frames exactly as sent (header
// and payload): the dialer's, then the acceptor's.
func Transcript(dialerHello, acceptorHello []byte) [sha256.Size]byte {
	h := sha256.New()
	h.Write(dialerHello)
	h.Write(acceptorHello)
	var t [sha256.Size]byte
	h.Sum(t[:0])
	return t
}

func derive(secret []byte, label string, t [sha256.Size]byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(label))
	m.Write(t[:])
	return m.Sum(nil)
}

// Proof is what one end sends in its Auth frame: evidence that it holds
// secret, bound to this session's transcript. The labels differ by side,
// so one end's proof never passes as the other's.
func Proof(secret []byte, dialer bool, t [sha256.Size]byte) []byte {
	side := "acceptor"
	if dialer {
		side = "dialer"
	}
	return derive(secret, "tcpha/2 proof "+side, t)
}

// SessionKeys derives the per-direction frame keys of a session.
func SessionKeys(secret []byte, t [sha256.Size]byte) (dialerToAcceptor, acceptorToDialer []byte) {
	return derive(secret, "tcpha/2 dialer->acceptor", t), derive(secret, "tcpha/2 acceptor->dialer", t)
}
