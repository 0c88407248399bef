package repair

import (
	"bytes"
	"encoding/binary"
	"testing"

	"tcpha/handoff/wire"
)

func TestParseTCPInfo(t *testing.T) {
	// state ESTABLISHED, options TS|SACK|WSCALE|ECN(8), snd_wscale 7, rcv_wscale 9.
	raw := []byte{1, 0, 0, 0, 0, 0x0f, 0x97, 0xaa}
	got, err := parseTCPInfo(raw)
	if err != nil {
		t.Fatal(err)
	}
	want := tcpInfoHead{State: 1, Options: wire.OptTimestamps | wire.OptSACK | wire.OptWScale, SndWScale: 7, RcvWScale: 9}
	if got != want {
		t.Errorf("got %+v, want %+v", got, want)
	}
	if _, err := parseTCPInfo(raw[:6]); err == nil {
		t.Error("short tcp_info accepted")
	}
}

func TestEncodeRepairOptions(t *testing.T) {
	ci := &wire.ConnInfo{MSS: 1448, Options: wire.OptTimestamps | wire.OptSACK | wire.OptWScale, SndWScale: 7, RcvWScale: 9}
	b := encodeRepairOptions(ci)
	if len(b) != 4*sizeofRepairOpt {
		t.Fatalf("len = %d, want 4 options", len(b))
	}
	var want []byte
	for _, v := range []uint32{2, 1448, 3, 7 | 9<<16, 4, 0, 8, 0} {
		want = binary.NativeEndian.AppendUint32(want, v)
	}
	if !bytes.Equal(b, want) {
		t.Errorf("got %x\nwant %x", b, want)
	}
	if b := encodeRepairOptions(&wire.ConnInfo{MSS: 536}); len(b) != sizeofRepairOpt {
		t.Errorf("no options: %d bytes, want only MSS", len(b))
	}
}

func TestWindowLayout(t *testing.T) {
	w := wire.Window{SndWl1: 1, SndWnd: 2, MaxWindow: 3, RcvWnd: 4, RcvWup: 5}
	b := encodeWindow(w)
	if len(b) != sizeofRepairWindow || binary.NativeEndian.Uint32(b[16:]) != 5 {
		t.Fatalf("layout %x", b)
	}
	got, err := decodeWindow(b)
	if err != nil || got != w {
		t.Errorf("round trip %+v, %v", got, err)
	}
	if _, err := decodeWindow(b[:19]); err == nil {
		t.Error("short window accepted")
	}
}
