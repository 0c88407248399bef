package ctl

import (
	"bufio"
	"crypto/hmac"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"tcpha/handoff/wire"
)

// ErrHandshake wraps every reason a session was not established.
var ErrHandshake = errors.New("control handshake failed")

// Admit decides, during the handshake, whether the accepting end takes a
// session from a peer that sent h from remote. It runs before any proof is
// checked and must be cheap.
type Admit func(remote net.Addr, h wire.Hello) error

// Dial runs the dialing end's handshake on conn:
//
//	dialer   → Hello(nonce D)
//	acceptor → Hello(nonce A), Auth(proof of the key over both Hellos)
//	dialer   → Auth(its own proof)
//
// With a secret, both proofs are checked and every later frame carries a
// MAC under keys derived from the two Hellos; without one, neither end
// sends Auth. On success the session runs; on failure conn is closed.
func Dial(conn net.Conn, cfg *Config) (*Session, error) {
	s, err := handshake(conn, cfg, true, nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	s.start()
	return s, nil
}

// Accept runs the accepting end's handshake on conn; admit, if not nil,
// may refuse the peer by its Hello.
func Accept(conn net.Conn, cfg *Config, admit Admit) (*Session, error) {
	s, err := handshake(conn, cfg, false, admit)
	if err != nil {
		conn.Close()
		return nil, err
	}
	s.start()
	return s, nil
}

func handshake(conn net.Conn, cfg *Config, dialer bool, admit Admit) (*Session, error) {
	conn.SetDeadline(time.Now().Add(cfg.handshakeTimeout()))
	br := bufio.NewReaderSize(conn, 32<<10)
	s := newSession(cfg, conn, br, dialer)
	rd := wire.Reader{R: br, Max: wire.MaxHandshakePayload}
	fail := func(format string, a ...any) (*Session, error) {
		return nil, fmt.Errorf("%w with %v: %s", ErrHandshake, conn.RemoteAddr(), fmt.Sprintf(format, a...))
	}

	mine := cfg.Local
	mine.Keyed = len(cfg.Secret) > 0
	if _, err := rand.Read(mine.Nonce[:]); err != nil {
		return fail("nonce: %v", err)
	}
	payload, err := mine.MarshalBinary()
	if err != nil {
		return fail("%v", err)
	}
	myHello, _ := wire.AppendFrame(nil, wire.Frame{Type: wire.TypeHello, Payload: payload}, nil)

	var peerHello []byte
	readHello := func() error {
		f, err := rd.Read()
		if err != nil {
			return fmt.Errorf("read hello: %w", err)
		}
		if f.Type != wire.TypeHello {
			return fmt.Errorf("got %s, want hello", f.Type)
		}
		if err := s.Peer.UnmarshalBinary(f.Payload); err != nil {
			return err
		}
		// The encoding is canonical: re-encoding gives the bytes sent.
		peerHello, _ = wire.AppendFrame(nil, f, nil)
		return nil
	}
	if dialer {
		if _, err := conn.Write(myHello); err != nil {
			return fail("send hello: %v", err)
		}
		if err := readHello(); err != nil {
			return fail("%v", err)
		}
	} else {
		if err := readHello(); err != nil {
			return fail("%v", err)
		}
		if admit != nil {
			if err := admit(conn.RemoteAddr(), s.Peer); err != nil {
				return fail("refused: %v", err)
			}
		}
	}
	var dHello, aHello []byte
	if dialer {
		dHello, aHello = myHello, peerHello
	} else {
		dHello, aHello = peerHello, myHello
	}
	t := wire.Transcript(dHello, aHello)
	keyed := mine.Keyed && s.Peer.Keyed
	auth, _ := wire.AppendFrame(nil, wire.Frame{Type: wire.TypeAuth, Payload: wire.Proof(cfg.Secret, dialer, t)}, nil)
	if !dialer {
		// An admitted peer always gets this end's Hello, so that both ends
		// can say what is wrong when their secrets disagree.
		out := myHello
		if keyed {
			out = append(out, auth...)
		}
		if _, err := conn.Write(out); err != nil {
			return fail("send hello: %v", err)
		}
	}
	switch {
	case mine.Keyed && !s.Peer.Keyed:
		return fail("the peer has no cluster secret, this agent has one: set the same [global] secret on both")
	case !mine.Keyed && s.Peer.Keyed:
		return fail("the peer has a cluster secret, this agent has none: set the same [global] secret on both")
	case !keyed:
		s.rd = wire.Reader{R: br}
		conn.SetDeadline(time.Time{})
		return s, nil
	}
	f, err := rd.Read()
	switch {
	case err != nil && !dialer && errors.Is(err, io.EOF):
		// The dialer checks this end's proof first and hangs up on a
		// wrong one: its secret differs.
		return fail("the peer hung up on this agent's proof: it does not hold this cluster's secret")
	case err != nil:
		return fail("read auth: %v", err)
	case f.Type != wire.TypeAuth:
		return fail("got %s, want auth", f.Type)
	case !hmac.Equal(f.Payload, wire.Proof(cfg.Secret, !dialer, t)):
		return fail("wrong proof: the peer does not hold this cluster's secret")
	}
	if dialer {
		if _, err := conn.Write(auth); err != nil {
			return fail("send auth: %v", err)
		}
	}
	d2a, a2d := wire.SessionKeys(cfg.Secret, t)
	if dialer {
		s.wkey, s.rd = wire.NewKeyed(d2a), wire.Reader{R: br, Key: wire.NewKeyed(a2d)}
	} else {
		s.wkey, s.rd = wire.NewKeyed(a2d), wire.Reader{R: br, Key: wire.NewKeyed(d2a)}
	}
	conn.SetDeadline(time.Time{})
	return s, nil
}
