package ctl

import (
	"bytes"
	"net"
	"net/netip"
	"testing"
	"time"

	"tcpha/handoff/wire"
)

// byteConn plays a peer that sent b and then closed; what this end writes
// is dropped.
type byteConn struct {
	r *bytes.Reader
}

func (c *byteConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *byteConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *byteConn) Close() error                     { return nil }
func (c *byteConn) LocalAddr() net.Addr              { return &net.TCPAddr{IP: net.IPv4(10, 0, 0, 11), Port: 666} }
func (c *byteConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(10, 0, 0, 2), Port: 40000} }
func (c *byteConn) SetDeadline(time.Time) error      { return nil }
func (c *byteConn) SetReadDeadline(time.Time) error  { return nil }
func (c *byteConn) SetWriteDeadline(time.Time) error { return nil }

// FuzzHandshake feeds arbitrary bytes to the accepting end of a session,
// with and without a secret: it must end with an error or a session, never
// panic; with a secret, no input can carry a proof, so none is accepted.
func FuzzHandshake(f *testing.F) {
	hello := wire.Hello{Role: wire.RoleFE, Addr: netip.MustParseAddrPort("10.0.0.2:0"), VIP: netip.MustParseAddrPort("10.0.0.100:80")}
	hp, _ := hello.MarshalBinary()
	h, _ := wire.AppendFrame(nil, wire.Frame{Type: wire.TypeHello, Payload: hp}, nil)
	f.Add(h, false)
	f.Add(append(h, make([]byte, 24+32)...), true)
	offer, _ := wire.AppendFrame(nil, wire.Frame{Type: wire.TypeOffer, ID: 1, Payload: []byte("x")}, nil)
	f.Add(append(append([]byte(nil), h...), offer...), false)
	f.Fuzz(func(t *testing.T, b []byte, keyed bool) {
		cfg := &Config{Local: wire.Hello{Role: wire.RoleBE}, Log: quiet()}
		if keyed {
			cfg.Secret = []byte("k")
		}
		s, err := handshake(&byteConn{bytes.NewReader(b)}, cfg, false, nil)
		if err == nil && keyed {
			t.Fatalf("a session with a secret from %d fuzzed bytes", len(b))
		}
		if s != nil && err == nil {
			// Unkeyed: the session's reader must cope with the rest.
			for {
				if _, err := s.rd.Read(); err != nil {
					break
				}
			}
		}
	})
}
