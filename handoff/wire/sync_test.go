package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

func syncSample() SyncBatch {
	return SyncBatch{Flags: SyncBegin, Events: []SyncEvent{
		{Kind: SyncForward, Flow: netip.MustParseAddrPort("10.0.0.10:1000"), BE: netip.MustParseAddr("10.0.0.11")},
		{Kind: SyncTimeWait, Flow: netip.MustParseAddrPort("10.0.0.10:2000"), BE: netip.MustParseAddr("10.0.0.12"), Left: 9500 * time.Millisecond},
		{Kind: SyncRemove, Flow: netip.MustParseAddrPort("10.0.0.10:3000")},
	}}
}

func TestSyncRoundTrip(t *testing.T) {
	s := syncSample()
	b, err := s.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{1, 0, 3,
		1, 4, 10, 0, 0, 10, 0x03, 0xe8, 4, 10, 0, 0, 11, 0, 0, 0, 0,
		2, 4, 10, 0, 0, 10, 0x07, 0xd0, 4, 10, 0, 0, 12, 0, 0, 0x25, 0x1c,
		3, 4, 10, 0, 0, 10, 0x0b, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if !bytes.Equal(b, want) {
		t.Fatalf("encoded % x\nwant    % x", b, want)
	}
	var got SyncBatch
	if err := got.UnmarshalBinary(b); err != nil || !reflect.DeepEqual(got, s) {
		t.Fatalf("decoded %+v %v\nwant %+v", got, err, s)
	}
	empty, _ := SyncBatch{Flags: SyncBegin | SyncEnd}.MarshalBinary()
	if err := got.UnmarshalBinary(empty); err != nil || got.Flags != SyncBegin|SyncEnd || len(got.Events) != 0 {
		t.Errorf("empty resync: %+v %v", got, err)
	}
}

// What a peer may not send: every bound the receiver relies on, both when
// encoding (a bug here) and decoding (a bug or a forgery there).
func TestSyncBounds(t *testing.T) {
	flow, be := netip.MustParseAddrPort("10.0.0.10:1000"), netip.MustParseAddr("10.0.0.11")
	for name, s := range map[string]SyncBatch{
		"unknown flag":       {Flags: 4},
		"kind 0":             {Events: []SyncEvent{{Flow: flow, BE: be}}},
		"unknown kind":       {Events: []SyncEvent{{Kind: 4, Flow: flow, BE: be}}},
		"no port":            {Events: []SyncEvent{{Kind: SyncForward, Flow: netip.AddrPortFrom(flow.Addr(), 0), BE: be}}},
		"IPv6 flow":          {Events: []SyncEvent{{Kind: SyncForward, Flow: netip.MustParseAddrPort("[::1]:5"), BE: be}}},
		"forward without BE": {Events: []SyncEvent{{Kind: SyncForward, Flow: flow}}},
		"remove with BE":     {Events: []SyncEvent{{Kind: SyncRemove, Flow: flow, BE: be}}},
		"unspecified BE":     {Events: []SyncEvent{{Kind: SyncForward, Flow: flow, BE: netip.IPv4Unspecified()}}},
		"left on forward":    {Events: []SyncEvent{{Kind: SyncForward, Flow: flow, BE: be, Left: time.Second}}},
		"left too long":      {Events: []SyncEvent{{Kind: SyncTimeWait, Flow: flow, BE: be, Left: MaxSyncLeft + time.Millisecond}}},
		"flow twice":         {Events: []SyncEvent{{Kind: SyncForward, Flow: flow, BE: be}, {Kind: SyncRemove, Flow: flow}}},
		"left not whole ms":  {Events: []SyncEvent{{Kind: SyncTimeWait, Flow: flow, BE: be, Left: time.Microsecond}}},
		"too many events":    {Events: make([]SyncEvent, MaxSyncEvents+1)},
	} {
		if _, err := s.MarshalBinary(); !errors.Is(err, ErrFormat) {
			t.Errorf("%s encoded: %v", name, err)
		}
	}
	good, _ := syncSample().MarshalBinary()
	for name, b := range map[string][]byte{
		"empty":          {},
		"truncated":      good[:len(good)-1],
		"trailing":       append(append([]byte{}, good...), 0),
		"BE family 6":    func() []byte { b := bytes.Clone(good); b[3+8] = 6; return b }(),
		"zero BE bytes":  func() []byte { b := bytes.Clone(good); b[3+2*17+9] = 1; return b }(),
		"count too high": func() []byte { b := bytes.Clone(good); binary.BigEndian.PutUint16(b[1:], MaxSyncEvents+1); return b }(),
		"left too long":  func() []byte { b := bytes.Clone(good); binary.BigEndian.PutUint32(b[3+17+13:], 0xffffffff); return b }(),
	} {
		var s SyncBatch
		if err := s.UnmarshalBinary(b); !errors.Is(err, ErrFormat) {
			t.Errorf("%s decoded: %+v %v, want ErrFormat", name, s, err)
		}
	}
}

// FuzzSync feeds the sync batch parser: no panic, whatever decodes
// re-encodes to the same bytes and holds the bounds.
func FuzzSync(f *testing.F) {
	good, _ := syncSample().MarshalBinary()
	empty, _ := SyncBatch{Flags: SyncEnd}.MarshalBinary()
	for _, b := range [][]byte{good, empty, {3, 0, 0}, {0, 0xff, 0xff}} {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var s SyncBatch
		if s.UnmarshalBinary(b) != nil {
			return
		}
		if len(s.Events) > MaxSyncEvents {
			t.Fatalf("accepted %d events", len(s.Events))
		}
		again, err := s.MarshalBinary()
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("sync: re-encode mismatch: %v", err)
		}
	})
}
