package wire

import (
	"bytes"
	"testing"
)

func BenchmarkEncodeOffer(b *testing.B) {
	ci := sample()
	k := NewKeyed([]byte("k"))
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		p, _ := ci.MarshalBinary()
		buf, _ = AppendFrame(buf[:0], Frame{Type: TypeOffer, ID: 1, ConnMagic: ci.ConnMagic(), Payload: p}, k)
	}
}

func BenchmarkDecodeOffer(b *testing.B) {
	ci := sample()
	p, _ := ci.MarshalBinary()
	frame, _ := AppendFrame(nil, Frame{Type: TypeOffer, ID: 1, Payload: p}, NewKeyed([]byte("k")))
	rd := bytes.NewReader(frame)
	b.ReportAllocs()
	for b.Loop() {
		rd.Reset(frame)
		// A fresh key each time: the sequence number must start over.
		f, err := (&Reader{R: rd, Key: NewKeyed([]byte("k"))}).Read()
		if err != nil {
			b.Fatal(err)
		}
		var out ConnInfo
		if err := out.UnmarshalBinary(f.Payload); err != nil {
			b.Fatal(err)
		}
	}
}
