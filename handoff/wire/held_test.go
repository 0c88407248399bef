package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
)

func TestHeldAskRoundTrip(t *testing.T) {
	for _, after := range []netip.AddrPort{{}, netip.MustParseAddrPort("10.0.0.10:40000")} {
		b, err := HeldAsk{After: after}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var got HeldAsk
		if err := got.UnmarshalBinary(b); err != nil || got.After != after {
			t.Errorf("%v: got %v, %v", after, got.After, err)
		}
	}
	if _, err := (HeldAsk{After: netip.MustParseAddrPort("[::1]:80")}).MarshalBinary(); err == nil {
		t.Error("an IPv6 cursor encoded")
	}
	for name, bad := range map[string][]byte{
		"empty":           {},
		"truncated":       {4, 10, 0, 0},
		"trailing":        {4, 10, 0, 0, 10, 0, 80, 0},
		"family 6":        {6, 10, 0, 0, 10, 0, 80},
		"zero with bytes": {0, 0, 0, 0, 1, 0, 0},
	} {
		var h HeldAsk
		if err := h.UnmarshalBinary(bad); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: %v, want ErrFormat", name, err)
		}
	}
}

func TestHeldList(t *testing.T) {
	a := netip.MustParseAddrPort("10.0.0.10:1000")
	b := netip.MustParseAddrPort("10.0.0.10:2000")
	c := netip.MustParseAddrPort("10.0.0.11:5")
	good, err := HeldList{More: true, Flows: []netip.AddrPort{a, b, c}}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{1, 0, 3, 4, 10, 0, 0, 10, 0x03, 0xe8, 4, 10, 0, 0, 10, 0x07, 0xd0, 4, 10, 0, 0, 11, 0, 5}
	if !bytes.Equal(good, want) {
		t.Fatalf("encoded % x\nwant    % x", good, want)
	}
	var l HeldList
	if err := l.UnmarshalBinary(good); err != nil || !l.More || len(l.Flows) != 3 || l.Flows[2] != c {
		t.Fatalf("%+v %v", l, err)
	}
	empty, _ := HeldList{}.MarshalBinary()
	if err := l.UnmarshalBinary(empty); err != nil || l.More || len(l.Flows) != 0 {
		t.Errorf("empty last page: %+v %v", l, err)
	}
	max := make([]byte, 3, 3+(MaxHeldFlows+1)*addrPortLen)
	binary.BigEndian.PutUint16(max[1:], MaxHeldFlows+1)
	for name, bad := range map[string][]byte{
		"empty":             {},
		"no count":          {0, 0},
		"truncated":         good[:len(good)-1],
		"trailing":          append(append([]byte{}, good...), 0),
		"unknown flag":      {2, 0, 0},
		"more, but nothing": {1, 0, 0},
		"too many":          max,
		"descending":        {0, 0, 2, 4, 10, 0, 0, 10, 0x07, 0xd0, 4, 10, 0, 0, 10, 0x03, 0xe8},
		"duplicate":         {0, 0, 2, 4, 10, 0, 0, 10, 0x07, 0xd0, 4, 10, 0, 0, 10, 0x07, 0xd0},
		"family 0":          {0, 0, 1, 0, 0, 0, 0, 0, 0, 0},
	} {
		var l HeldList
		if err := l.UnmarshalBinary(bad); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: %v, want ErrFormat", name, err)
		}
	}
	for name, l := range map[string]HeldList{
		"unordered": {Flows: []netip.AddrPort{b, a}},
		"ipv6":      {Flows: []netip.AddrPort{netip.MustParseAddrPort("[::1]:80")}},
		"empty+":    {More: true},
		"too many":  {Flows: make([]netip.AddrPort, MaxHeldFlows+1)},
	} {
		if _, err := l.MarshalBinary(); !errors.Is(err, ErrFormat) {
			t.Errorf("encode %s: %v, want ErrFormat", name, err)
		}
	}
}

// FuzzHeld feeds the held question and answer parsers: no panic, whatever
// decodes re-encodes to the same bytes, and a list is bounded and strictly
// ascending, which the FE's paging relies on.
func FuzzHeld(f *testing.F) {
	ask, _ := HeldAsk{After: netip.MustParseAddrPort("10.0.0.10:40000")}.MarshalBinary()
	zero, _ := HeldAsk{}.MarshalBinary()
	list, _ := HeldList{More: true, Flows: []netip.AddrPort{
		netip.MustParseAddrPort("10.0.0.10:1000"), netip.MustParseAddrPort("10.0.0.10:2000")}}.MarshalBinary()
	empty, _ := HeldList{}.MarshalBinary()
	for _, b := range [][]byte{ask, zero, list, empty, {1, 0, 0}, {0, 0xff, 0xff}} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var h HeldAsk
		if h.UnmarshalBinary(b) == nil {
			again, err := h.MarshalBinary()
			if err != nil || !bytes.Equal(again, b) {
				t.Fatalf("held: re-encode mismatch: %v", err)
			}
		}
		var l HeldList
		if l.UnmarshalBinary(b) != nil {
			return
		}
		if len(l.Flows) > MaxHeldFlows || (l.More && len(l.Flows) == 0) {
			t.Fatalf("accepted %d flows, more %v", len(l.Flows), l.More)
		}
		for i := 1; i < len(l.Flows); i++ {
			if l.Flows[i-1].Compare(l.Flows[i]) >= 0 {
				t.Fatalf("accepted flows out of order: %v %v", l.Flows[i-1], l.Flows[i])
			}
		}
		again, err := l.MarshalBinary()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("held list: re-encode mismatch: %v", err)
		}
	})
}
