package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"testing"
)

type runtimeMem struct{ m runtime.MemStats }

func (r *runtimeMem) alloc() uint64 {
	runtime.ReadMemStats(&r.m)
	return r.m.TotalAlloc
}

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

// pair returns the two ends' MAC states for one direction.
func pair(key string) (send, recv *Keyed) {
	if key == "" {
		return nil, nil
	}
	return NewKeyed([]byte(key)), NewKeyed([]byte(key))
}

func encode(t testing.TB, k *Keyed, frames ...Frame) []byte {
	t.Helper()
	var b []byte
	for _, f := range frames {
		var err error
		if b, err = AppendFrame(b, f, k); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

func TestFrameRoundTrip(t *testing.T) {
	for _, key := range []string{"", "k"} {
		send, recv := pair(key)
		frames := []Frame{
			{TypeOffer, 1, 7, []byte("payload")},
			{TypeCommit, 1, 7, nil},
			{TypeProbe, 1<<63 + 5, 0, []byte{}},
		}
		r := Reader{R: bytes.NewReader(encode(t, send, frames...)), Key: recv}
		for _, want := range frames {
			got, err := r.Read()
			if err != nil {
				t.Fatal(err)
			}
			if got.Type != want.Type || got.ID != want.ID || got.ConnMagic != want.ConnMagic || !bytes.Equal(got.Payload, want.Payload) {
				t.Errorf("key %q: got %+v want %+v", key, got, want)
			}
		}
		if _, err := r.Read(); err != io.EOF {
			t.Errorf("after last frame: err = %v, want io.EOF", err)
		}
	}
}

func TestFrameRejects(t *testing.T) {
	ack := Frame{Type: TypeAck, ID: 3, ConnMagic: 1, Payload: []byte{0, 0, 0}}
	plain := encode(t, nil, ack)
	signed := encode(t, NewKeyed([]byte("right")), ack)
	flip := func(b []byte, i int) []byte { b = append([]byte(nil), b...); b[i] ^= 1; return b }
	huge := append([]byte(nil), plain[:HeaderLen]...)
	binary.BigEndian.PutUint32(huge[20:], MaxPayload+1)
	// Two frames: replaying the first, or delivering them swapped, fails
	// the sequence number in the MAC.
	k := NewKeyed([]byte("right"))
	first := encode(t, k, Frame{Type: TypeCommit, ID: 1})
	second := encode(t, k, Frame{Type: TypeAbort, ID: 1})
	cases := []struct {
		name string
		key  string
		b    []byte
		max  uint32
		want error
	}{
		{"bad magic", "", flip(plain, 0), 0, ErrMagic},
		{"version 1", "", flip(plain, 4), 0, ErrVersion},
		{"unknown flag", "", flip(plain, 6), 0, ErrBadMAC}, // the MAC bit set on an unkeyed reader
		{"flag bit 1", "", func() []byte { b := append([]byte(nil), plain...); b[6] = 2; return b }(), 0, ErrFormat},
		{"reserved byte", "", flip(plain, 7), 0, ErrFormat},
		{"too big", "", huge, 0, ErrTooBig},
		{"too big before authentication", "", plain, 2, ErrTooBig},
		{"truncated payload", "", plain[:len(plain)-1], 0, io.ErrUnexpectedEOF},
		{"wrong key", "wrong", signed, 0, ErrBadMAC},
		{"tampered payload", "right", flip(signed, HeaderLen), 0, ErrBadMAC},
		{"tampered id", "right", flip(signed, 15), 0, ErrBadMAC},
		{"tampered conn_magic", "right", flip(signed, 19), 0, ErrBadMAC},
		{"unsigned on a keyed session", "right", plain, 0, ErrBadMAC},
		{"signed on an unkeyed session", "", signed, 0, ErrBadMAC},
		{"truncated MAC", "right", signed[:len(signed)-1], 0, io.ErrUnexpectedEOF},
		{"second frame first", "right", append(append([]byte(nil), second...), first...), 0, ErrBadMAC},
	}
	for _, tc := range cases {
		var key *Keyed
		if tc.key != "" {
			key = NewKeyed([]byte(tc.key))
		}
		_, err := (&Reader{R: bytes.NewReader(tc.b), Key: key, Max: tc.max}).Read()
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.want)
		}
	}
	// A frame replayed after itself fails too: the receiver's sequence
	// number moved on.
	r := Reader{R: bytes.NewReader(append(append([]byte(nil), first...), first...)), Key: NewKeyed([]byte("right"))}
	if _, err := r.Read(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Read(); !errors.Is(err, ErrBadMAC) {
		t.Errorf("replayed frame: err = %v, want ErrBadMAC", err)
	}
}

// A header that claims a large payload allocates nothing until the bytes
// arrive.
func TestReaderGrowsWithData(t *testing.T) {
	h := encode(t, nil, Frame{Type: TypeOffer, Payload: make([]byte, 10)})[:HeaderLen]
	binary.BigEndian.PutUint32(h[20:], MaxPayload)
	allocs := testing.AllocsPerRun(20, func() {
		(&Reader{R: bytes.NewReader(append(h, 1, 2, 3))}).Read()
	})
	var ms runtimeMem
	before := ms.alloc()
	for range 20 {
		(&Reader{R: bytes.NewReader(append(h, 1, 2, 3))}).Read()
	}
	if per := (ms.alloc() - before) / 20; per > 2*readChunk {
		t.Errorf("a truncated 8 MiB frame allocated %d bytes (%v allocs), want at most %d", per, allocs, 2*readChunk)
	}
}

func TestHelloRoundTrip(t *testing.T) {
	in := Hello{Role: RoleFE, Keyed: true, Addr: netip.MustParseAddrPort("10.0.0.2:0"), VIP: netip.MustParseAddrPort("10.0.0.100:80"), TLSPort: 443}
	in.Nonce[0], in.Nonce[31] = 1, 2
	b, err := in.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > MaxHandshakePayload {
		t.Fatalf("hello of %d bytes exceeds the handshake bound", len(b))
	}
	var out Hello
	if err := out.UnmarshalBinary(b); err != nil || out != in {
		t.Errorf("round trip: %+v -> %+v, %v", in, out, err)
	}
	zero := Hello{Role: RoleBE}
	b, _ = zero.MarshalBinary()
	if err := out.UnmarshalBinary(b); err != nil || out != zero {
		t.Errorf("zero addresses: %+v, %v", out, err)
	}
	mut := func(i int, v byte) []byte { c, _ := in.MarshalBinary(); c[i] = v; return c }
	for name, bad := range map[string][]byte{
		"role 0": mut(0, 0),
		"role 3": mut(0, 3),
		"flags":  mut(1, 2),
		"TLS port from a BE": func() []byte {
			c, _ := zero.MarshalBinary()
			c[3] = 1
			return c
		}(),
		"family 6":  mut(4+NonceLen, 6),
		"truncated": b[:len(b)-1],
		"trailing":  append(append([]byte(nil), b...), 0),
		"zero family with data": func() []byte {
			c, _ := zero.MarshalBinary()
			c[4+NonceLen+1] = 1
			return c
		}(),
	} {
		if err := out.UnmarshalBinary(bad); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: err = %v, want ErrFormat", name, err)
		}
	}
}

// The handshake's derived values depend on the secret, the transcript and
// the side, so none stands in for another.
func TestHandshakeDerivations(t *testing.T) {
	t1 := Transcript([]byte("hello-d"), []byte("hello-a"))
	t2 := Transcript([]byte("hello-d"), []byte("hello-A"))
	secret := []byte("s")
	vals := map[string][]byte{
		"proof dialer":   Proof(secret, true, t1),
		"proof acceptor": Proof(secret, false, t1),
		"proof other t":  Proof(secret, true, t2),
		"proof other k":  Proof([]byte("S"), true, t1),
	}
	d2a, a2d := SessionKeys(secret, t1)
	vals["key d2a"], vals["key a2d"] = d2a, a2d
	seen := map[string]string{}
	for name, v := range vals {
		if other, dup := seen[string(v)]; dup {
			t.Errorf("%s equals %s", name, other)
		}
		seen[string(v)] = name
	}
	if !bytes.Equal(Proof(secret, true, t1), Proof(secret, true, t1)) {
		t.Error("proof not deterministic")
	}
}

func TestSmallPayloads(t *testing.T) {
	f := Flow{Client: netip.MustParseAddrPort("10.0.0.10:40000")}
	b, _ := f.MarshalBinary()
	var f2 Flow
	if err := f2.UnmarshalBinary(b); err != nil || f2 != f {
		t.Errorf("flow: %+v %v", f2, err)
	}
	if err := f2.UnmarshalBinary(append(b, 0)); !errors.Is(err, ErrFormat) {
		t.Errorf("flow trailing: %v", err)
	}
	for _, h := range []Health{{}, {ServerUp: true, Active: 12345}, {Draining: true}} {
		b, _ := h.MarshalBinary()
		var h2 Health
		if err := h2.UnmarshalBinary(b); err != nil || h2 != h {
			t.Errorf("health %+v: %+v %v", h, h2, err)
		}
	}
	var h Health
	if err := h.UnmarshalBinary([]byte{4, 0, 0, 0, 0}); !errors.Is(err, ErrFormat) {
		t.Errorf("health flags: %v", err)
	}
}

// FuzzFrame feeds arbitrary bytes to a session's frame reader, keyed or
// not, and whatever frame comes out to every payload decoder: nothing may
// panic, and whatever decodes must encode back to the same bytes.
func FuzzFrame(f *testing.F) {
	s := sample()
	p, _ := s.MarshalBinary()
	hello, _ := (&Hello{Role: RoleFE, Addr: netip.MustParseAddrPort("10.0.0.2:0")}).MarshalBinary()
	ack, _ := Ack{Result: ResultBusy, Reason: "x"}.MarshalBinary()
	flow, _ := Flow{Client: s.Client}.MarshalBinary()
	health, _ := Health{ServerUp: true, Active: 3}.MarshalBinary()
	sw, _ := Switch{Client: s.Client, To: netip.MustParseAddr("10.0.0.12")}.MarshalBinary()
	// A cluster frame with the accept bit and the FE's load view
	// (accept = be), so that the fuzzer starts from that branch too.
	be1 := netip.MustParseAddr("10.0.0.11")
	cl, _ := Cluster{PHTTP: PHTTPMulti, AcceptBE: true, Policy: "wlc",
		Servers: []ClusterServer{{Addr: be1, Port: 666, Weight: 1}},
		Rules:   []ClusterRule{{Targets: []netip.Addr{be1}, Pattern: `.*`}}, Loads: []uint32{3}}.MarshalBinary()
	for _, pl := range [][]byte{p, hello, ack, flow, health, sw, cl} {
		f.Add(encode(f, nil, Frame{Type: TypeOffer, ID: 1, Payload: pl}), false)
		f.Add(encode(f, NewKeyed([]byte("k")), Frame{Type: TypeOffer, ID: 1, Payload: pl}), true)
	}
	f.Fuzz(func(t *testing.T, b []byte, keyed bool) {
		r := Reader{R: bytes.NewReader(b), Max: 1 << 16}
		if keyed {
			r.Key = NewKeyed([]byte("k"))
		}
		fr, err := r.Read()
		if err != nil {
			return
		}
		check := func(name string, u interface {
			UnmarshalBinary([]byte) error
			MarshalBinary() ([]byte, error)
		}) {
			if u.UnmarshalBinary(fr.Payload) != nil {
				return
			}
			again, err := u.MarshalBinary()
			if err != nil || !bytes.Equal(again, fr.Payload) {
				t.Fatalf("%s: re-encode mismatch: %v", name, err)
			}
		}
		check("conninfo", &ConnInfo{})
		check("hello", &Hello{})
		check("flow", &Flow{})
		check("health", &Health{})
		check("register", &Register{})
		check("cluster", &Cluster{})
		check("held", &HeldAsk{})
		check("held-list", &HeldList{})
		check("switch", &Switch{})
		check("sync", &SyncBatch{})
		var a Ack
		_ = a.UnmarshalBinary(fr.Payload)
	})
}

func TestSwitchRoundTrip(t *testing.T) {
	sw := Switch{Client: netip.MustParseAddrPort("10.0.0.5:40000"), To: netip.MustParseAddr("10.0.0.12")}
	b, err := sw.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var got Switch
	if err := got.UnmarshalBinary(b); err != nil || got != sw {
		t.Fatalf("%+v %v", got, err)
	}
	for name, bad := range map[string][]byte{
		"truncated":        b[:len(b)-1],
		"trailing":         append(append([]byte{}, b...), 0),
		"no client":        make([]byte, len(b)),
		"a port on the BE": append(append([]byte{}, b[:len(b)-2]...), 0, 80),
	} {
		if err := got.UnmarshalBinary(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := (Switch{Client: sw.Client}).MarshalBinary(); err == nil {
		t.Error("a switch to no BE was encoded")
	}
}

func TestRegisterRoundTrip(t *testing.T) {
	r := Register{Weight: 3, Patterns: []string{`\.mp4$`, `^/video/`}}
	b, err := r.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var got Register
	if err := got.UnmarshalBinary(b); err != nil || got.Weight != 3 || len(got.Patterns) != 2 || got.Patterns[1] != "^/video/" {
		t.Fatalf("%+v %v", got, err)
	}
	for name, bad := range map[string][]byte{
		"no rules":  {0, 1, 0, 0},
		"truncated": b[:len(b)-1],
		"trailing":  append(append([]byte{}, b...), 0),
		"empty":     {0, 1, 0, 1, 0, 0},
		"too many":  {0, 1, 0xff, 0xff},
	} {
		if err := got.UnmarshalBinary(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestClusterRoundTrip(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	c := Cluster{PHTTP: PHTTPForward, Policy: "wlc",
		Servers: []ClusterServer{{Addr: be1, Port: 666, Weight: 3}, {Addr: be2, Port: 777, Weight: 1}},
		Rules: []ClusterRule{{Targets: []netip.Addr{be2}, Pattern: `\.jpg$`},
			{Targets: []netip.Addr{be1, be2}, Policy: "lard", Pattern: `\.html$`},
			{Targets: []netip.Addr{be2}, Host: `img\.example`},
			{Targets: []netip.Addr{be1}, Host: `www\.example`, Pattern: `^/api/`}, {Local: true, Pattern: ".*"}}}
	b, err := c.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var got Cluster
	if err := got.UnmarshalBinary(b); err != nil || !reflect.DeepEqual(got, c) {
		t.Fatalf("%+v %v", got, err)
	}
	for name, bad := range map[string][]byte{
		"truncated":    b[:len(b)-1],
		"trailing":     append(append([]byte{}, b...), 0),
		"unknown mode": append([]byte{9}, b[1:]...),
		"too many":     {0, 0, 0xff, 0xff},
		"empty":        {},
	} {
		if err := got.UnmarshalBinary(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// accept = be rides in the phttp byte; without it the encoding is the
	// older release's.
	c.AcceptBE = true
	ab, err := c.MarshalBinary()
	if err != nil || ab[0] != byte(PHTTPForward)|0x80 || b[0] != byte(PHTTPForward) {
		t.Fatalf("accept bit: % x / % x, %v", ab[:1], b[:1], err)
	}
	if err := got.UnmarshalBinary(ab); err != nil || !reflect.DeepEqual(got, c) {
		t.Fatalf("accept = be: %+v %v", got, err)
	}
	if _, err := (Cluster{Rules: []ClusterRule{{Pattern: ""}}}).MarshalBinary(); err == nil {
		t.Error("a rule without host or pattern was encoded")
	}
	// A host flag without its host, and a path-less rule without a host.
	noHost := []byte{0, 0, 0, 0, 0, 1, ruleHost, 0, 0, 0, 1, 'x'}
	noPath := []byte{0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0}
	for name, bad := range map[string][]byte{"host flag, no host": noHost, "no host, no path": noPath} {
		if err := got.UnmarshalBinary(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if err := got.UnmarshalBinary(append(noHost, 0, 1, 'h')); err != nil || got.Rules[0].Host != "h" {
		t.Errorf("host rule: %+v %v", got, err)
	}
}

func TestRelayStats(t *testing.T) {
	s := RelayStats{Requests: 1, BytesIn: 2, BytesOut: 3 << 40, UpstreamErrors: 4, MovesOut: 5, NotMoved: 6}
	b, _ := s.MarshalBinary()
	var got RelayStats
	if err := got.UnmarshalBinary(b); err != nil || got != s {
		t.Errorf("round trip: %+v %v", got, err)
	}
	// A newer BE's longer answer still reads; a short one does not.
	if err := got.UnmarshalBinary(append(b, 0, 0, 0, 0, 0, 0, 0, 9)); err != nil || got != s {
		t.Errorf("longer: %+v %v", got, err)
	}
	if err := got.UnmarshalBinary(b[:47]); err == nil {
		t.Error("a short payload read")
	}
	if TypeStats.String() != "stats" || TypeStatsReply.String() != "stats-reply" {
		t.Errorf("names: %v %v", TypeStats, TypeStatsReply)
	}
}

// The FE's load view rides after the rules, flagged in the phttp byte: a
// frame without it encodes as before, one with it round-trips, and a
// decoder that knows no loads (an older BE) refuses it rather than
// misreading it; a count that is not the servers' is refused.
func TestClusterLoads(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	c := Cluster{PHTTP: PHTTPMulti, AcceptBE: true, Policy: "wlc",
		Servers: []ClusterServer{{Addr: be1, Port: 666, Weight: 3}, {Addr: be2, Port: 777, Weight: 1}},
		Rules:   []ClusterRule{{Targets: []netip.Addr{be1, be2}, Pattern: `.*`}}}
	plain, err := c.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	c.Loads = []uint32{7, 1 << 30}
	b, err := c.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if b[0] != plain[0]|0x40 || !bytes.Equal(b[1:len(plain)], plain[1:]) || len(b) != len(plain)+2+8 {
		t.Fatalf("with loads % x, without % x", b, plain)
	}
	var got Cluster
	if err := got.UnmarshalBinary(b); err != nil || !reflect.DeepEqual(got, c) {
		t.Fatalf("%+v %v", got, err)
	}
	// An older decoder masked only the accept bit and refused a phttp
	// value over multi: this frame's 0x42 is one.
	if PHTTP(b[0]&^0x80) <= PHTTPMulti {
		t.Errorf("an older BE would read phttp %d", b[0]&^0x80)
	}
	short := slices.Clone(b)
	short[len(plain)+1] = 1 // one load for two servers
	for name, bad := range map[string][]byte{"truncated": b[:len(b)-1], "wrong count": short[:len(short)-4]} {
		if err := got.UnmarshalBinary(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	c.Loads = []uint32{1}
	if _, err := c.MarshalBinary(); err == nil {
		t.Error("one load for two servers was encoded")
	}
}
