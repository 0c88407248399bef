package queue

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"tcpha/handoff/conntab"
)

// pkt builds an IPv4/TCP packet.
func pkt(src, dst string, flags byte, payload int) []byte {
	s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
	b := make([]byte, 20+20+payload)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[8], b[9] = 64, 6
	copy(b[12:], s.Addr().AsSlice())
	copy(b[16:], d.Addr().AsSlice())
	binary.BigEndian.PutUint16(b[20:], s.Port())
	binary.BigEndian.PutUint16(b[22:], d.Port())
	b[32] = 5 << 4
	b[33] = flags
	return b
}

const (
	fin = 0x01
	syn = 0x02
	rst = 0x04
	ack = 0x10
)

func TestParse(t *testing.T) {
	p, err := Parse(pkt("10.0.0.10:40000", "10.0.0.100:80", fin|ack, 7))
	if err != nil {
		t.Fatal(err)
	}
	want := Packet{Src: netip.MustParseAddrPort("10.0.0.10:40000"), Dst: netip.MustParseAddrPort("10.0.0.100:80"),
		FIN: true, ACK: true, Payload: 7}
	if p != want {
		t.Errorf("got %+v, want %+v", p, want)
	}
	good := pkt("10.0.0.10:1", "10.0.0.100:80", ack, 0)
	mut := func(f func([]byte)) []byte { b := append([]byte(nil), good...); f(b); return b }
	bad := map[string][]byte{
		"short":           good[:19],
		"ipv6":            mut(func(b []byte) { b[0] = 0x65 }),
		"udp":             mut(func(b []byte) { b[9] = 17 }),
		"fragment":        mut(func(b []byte) { b[7] = 1 }),
		"ihl too small":   mut(func(b []byte) { b[0] = 0x44 }),
		"total too large": mut(func(b []byte) { binary.BigEndian.PutUint16(b[2:], 100) }),
		"tcp offset":      mut(func(b []byte) { b[32] = 15 << 4 }),
		"truncated tcp":   mut(func(b []byte) { binary.BigEndian.PutUint16(b[2:], 30) }),
	}
	for name, b := range bad {
		if _, err := Parse(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

func TestObserver(t *testing.T) {
	t0 := time.Unix(1000, 0)
	client := netip.MustParseAddrPort("10.0.0.10:40000")
	tab := conntab.New()
	tab.Begin(client, t0)
	tab.Handed(client, netip.MustParseAddr("10.0.0.11"), t0)
	o := &Observer{Table: tab, VIP: netip.MustParseAddrPort("10.0.0.100:80"), TLSPort: 443, TimeWait: 10 * time.Second,
		RSTWait: time.Second, Now: func() time.Time { return t0 }}
	var closed []netip.AddrPort // what the FE's flow sync hears
	o.Closed = func(f netip.AddrPort) { closed = append(closed, f) }

	cases := []struct {
		name   string
		b      []byte
		reason Reason
		state  conntab.State
	}{
		{"garbage", []byte{1, 2, 3}, ReasonMalformed, conntab.Handoffed},
		{"other destination", pkt("10.0.0.10:40000", "10.0.0.101:80", fin, 0), ReasonNotVIP, conntab.Handoffed},
		{"other port", pkt("10.0.0.10:40000", "10.0.0.100:8443", fin, 0), ReasonNotVIP, conntab.Handoffed},
		{"FIN", pkt("10.0.0.10:40000", "10.0.0.100:80", fin|ack, 0), ReasonForwarded, conntab.TimeWait},
		{"retransmitted FIN", pkt("10.0.0.10:40000", "10.0.0.100:80", fin|ack, 0), ReasonForwarded, conntab.TimeWait},
	}
	for _, tc := range cases {
		v, r := o.Handle(tc.b)
		if v != Drop || r != tc.reason {
			t.Errorf("%s: %v %v, want drop %v", tc.name, v, r, tc.reason)
		}
		if c, _ := tab.Get(client); c.State != tc.state {
			t.Errorf("%s: state %v, want %v", tc.name, c.State, tc.state)
		}
	}
	if c, _ := tab.Get(client); !c.Until.Equal(t0.Add(10 * time.Second)) {
		t.Errorf("TIME_WAIT until %v", c.Until)
	}
	// RST: a short wait.
	other := netip.MustParseAddrPort("10.0.0.10:40001")
	tab.Begin(other, t0)
	tab.Handed(other, netip.MustParseAddr("10.0.0.11"), t0)
	o.Handle(pkt("10.0.0.10:40001", "10.0.0.100:443", rst, 0)) // the TLS port's flows too
	if c, _ := tab.Get(other); c.State != conntab.TimeWait || !c.Until.Equal(t0.Add(time.Second)) {
		t.Errorf("RST: %+v", c)
	}
	// An unknown flow is the FE's own: no entry appears.
	o.Handle(pkt("10.0.0.10:9", "10.0.0.100:80", fin, 0))
	if _, ok := tab.Get(netip.MustParseAddrPort("10.0.0.10:9")); ok {
		t.Error("a FIN of an unknown flow created an entry")
	}
	if want := []netip.AddrPort{client, client, other}; !slices.Equal(closed, want) {
		t.Errorf("closed %v, want %v (each packet that leaves a flow in TIME_WAIT)", closed, want)
	}
	if o.Total() != 7 {
		t.Errorf("total %d, want 7", o.Total())
	}
	got := map[string]int64{}
	for _, c := range o.Counts() {
		got[c.Label] = c.N
	}
	if got["reason=malformed"] != 1 || got["reason=forwarded-copy"] != 4 || got["event=fin"] != 3 || got["event=rst"] != 1 {
		t.Errorf("counts %v", got)
	}
	// tcpha_nfqueue_packets_total: each packet once, so the series add
	// up to the packets queued (they once added up to about twice).
	sum := int64(0)
	for _, p := range o.Packets() {
		sum += p.N
	}
	if sum != o.Total() {
		t.Errorf("packets %v add up to %d, want the %d queued", o.Packets(), sum, o.Total())
	}
	if p := o.Packets(); len(p) == 0 || p[0] != (PacketCount{PacketKey{"", ReasonMalformed}, 1}) {
		t.Errorf("packets %v: want the garbage first, without an event", p)
	}
}

func FuzzParse(f *testing.F) {
	f.Add(pkt("10.0.0.10:40000", "10.0.0.100:80", fin|ack, 3))
	f.Add([]byte{0x45})
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse(b)
		if err != nil {
			return
		}
		if p.Payload < 0 || p.Payload > len(b)-40 {
			t.Fatalf("payload %d of a %d-byte packet", p.Payload, len(b))
		}
	})
}
