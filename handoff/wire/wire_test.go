package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/netip"
	"reflect"
	"testing"
)

func sample() ConnInfo {
	return ConnInfo{
		Client:    netip.MustParseAddrPort("10.0.0.10:40000"),
		VIP:       netip.MustParseAddrPort("10.0.0.100:80"),
		SndSeq:    0xfffffff0,
		RcvSeq:    12345,
		MSS:       1460,
		Options:   OptTimestamps | OptSACK | OptWScale,
		SndWScale: 7,
		RcvWScale: 9,
		Timestamp: 987654,
		Window:    Window{SndWl1: 12345, SndWnd: 64240, MaxWindow: 64240, RcvWnd: 65483, RcvWup: 12345},
		SendQueue: []byte("abc"),
		Unsent:    1,
		RecvQueue: []byte("GET / HTTP/1.1\r\n\r\n"),
	}
}

func TestConnInfoRoundTrip(t *testing.T) {
	in := sample()
	b, err := in.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var out ConnInfo
	if err := out.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(in, out) {
		t.Errorf("round trip:\n in %+v\nout %+v", in, out)
	}
	if out.ConnMagic() != 12345+18 {
		t.Errorf("conn_magic = %d, want rcv_nxt %d", out.ConnMagic(), 12345+18)
	}
}

func TestConnInfoRejects(t *testing.T) {
	good, _ := func() ([]byte, error) { s := sample(); return s.MarshalBinary() }()
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := map[string][]byte{
		"empty":          {},
		"truncated":      good[:len(good)-1],
		"trailing":       append(append([]byte(nil), good...), 0),
		"family 6":       mut(func(b []byte) []byte { b[0] = 6; return b }),
		"client port 0":  mut(func(b []byte) []byte { b[5], b[6] = 0, 0; return b }),
		"option bits":    mut(func(b []byte) []byte { b[24] = 0x80; return b }),
		"wscale 15":      mut(func(b []byte) []byte { b[25] = 15; return b }),
		"mss 0":          mut(func(b []byte) []byte { b[22], b[23] = 0, 0; return b }),
		"unsent > queue": mut(func(b []byte) []byte { binary.BigEndian.PutUint32(b[52:], 9); return b }),
		"queue too long": mut(func(b []byte) []byte { binary.BigEndian.PutUint32(b[56:], 0xffffffff); return b }),
	}
	for name, b := range cases {
		var c ConnInfo
		if err := c.UnmarshalBinary(b); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: err = %v, want ErrFormat", name, err)
		}
	}
	bad := sample()
	bad.VIP = netip.AddrPort{}
	if _, err := bad.MarshalBinary(); !errors.Is(err, ErrFormat) {
		t.Errorf("marshal invalid VIP: err = %v", err)
	}
}

func TestAckRoundTrip(t *testing.T) {
	for _, a := range []Ack{{ResultOK, ""}, {ResultRestore, "connect: address not available"}} {
		b, _ := a.MarshalBinary()
		var got Ack
		if err := got.UnmarshalBinary(b); err != nil || got != a {
			t.Errorf("%+v -> %+v, %v", a, got, err)
		}
	}
	var a Ack
	for _, b := range [][]byte{{}, {0, 0}, {0, 0, 1}, {99, 0, 0}, {0, 0, 0, 1}} {
		if err := a.UnmarshalBinary(b); !errors.Is(err, ErrFormat) {
			t.Errorf("%x: err = %v, want ErrFormat", b, err)
		}
	}
}

func TestFrameRoundTrip(t *testing.T) {
	for _, secret := range [][]byte{nil, []byte("k")} {
		c := Codec{Secret: secret}
		var buf bytes.Buffer
		frames := []Frame{{TypeRequest, 7, []byte("payload")}, {TypeCommit, 7, nil}, {TypePing, 0, []byte{}}}
		for _, f := range frames {
			if err := c.Write(&buf, f); err != nil {
				t.Fatal(err)
			}
		}
		for _, want := range frames {
			got, err := c.Read(&buf)
			if err != nil {
				t.Fatal(err)
			}
			if got.Type != want.Type || got.ConnMagic != want.ConnMagic || !bytes.Equal(got.Payload, want.Payload) {
				t.Errorf("secret %q: got %+v want %+v", secret, got, want)
			}
		}
		if _, err := c.Read(&buf); err != io.EOF {
			t.Errorf("after last frame: err = %v, want io.EOF", err)
		}
	}
}

func TestFrameRejects(t *testing.T) {
	plain, _ := Codec{}.Append(nil, Frame{Type: TypeAck, ConnMagic: 1, Payload: []byte{0, 0, 0}})
	signed, _ := Codec{Secret: []byte("right")}.Append(nil, Frame{Type: TypeAck, ConnMagic: 1, Payload: []byte{0, 0, 0}})
	flip := func(b []byte, i int) []byte { b = append([]byte(nil), b...); b[i] ^= 1; return b }
	huge := append([]byte(nil), plain[:HeaderLen]...)
	binary.BigEndian.PutUint32(huge[12:], MaxPayload+1)
	cases := []struct {
		name   string
		secret string
		b      []byte
		want   error
	}{
		{"bad magic", "", flip(plain, 0), ErrMagic},
		{"bad version", "", flip(plain, 4), ErrVersion},
		{"too big", "", huge, ErrTooBig},
		{"truncated payload", "", plain[:len(plain)-1], io.ErrUnexpectedEOF},
		{"wrong secret", "wrong", signed, ErrBadMAC},
		{"tampered payload", "right", flip(signed, HeaderLen), ErrBadMAC},
		{"tampered conn_magic", "right", flip(signed, 11), ErrBadMAC},
		{"unsigned but secret set", "right", plain, ErrBadMAC},
		{"signed but no secret", "", signed, ErrBadMAC},
		{"truncated MAC", "right", signed[:len(signed)-1], io.ErrUnexpectedEOF},
	}
	for _, tc := range cases {
		_, err := Codec{Secret: []byte(tc.secret)}.Read(bytes.NewReader(tc.b))
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.want)
		}
	}
}

func FuzzDecode(f *testing.F) {
	s := sample()
	p, _ := s.MarshalBinary()
	fr, _ := Codec{}.Append(nil, Frame{Type: TypeRequest, Payload: p})
	f.Add(fr, false)
	fr, _ = Codec{Secret: []byte("k")}.Append(nil, Frame{Type: TypeRequest, Payload: p})
	f.Add(fr, true)
	f.Fuzz(func(t *testing.T, b []byte, signed bool) {
		c := Codec{}
		if signed {
			c.Secret = []byte("k")
		}
		fr, err := c.Read(bytes.NewReader(b))
		if err != nil {
			return
		}
		var ci ConnInfo
		if ci.UnmarshalBinary(fr.Payload) == nil {
			// Whatever decodes must encode back to the same bytes.
			again, err := ci.MarshalBinary()
			if err != nil || !bytes.Equal(again, fr.Payload) {
				t.Fatalf("re-encode mismatch: %v", err)
			}
		}
		var a Ack
		_ = a.UnmarshalBinary(fr.Payload)
	})
}
