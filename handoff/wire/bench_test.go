package wire

import (
	"bytes"
	"testing"
)

func BenchmarkEncodeRequest(b *testing.B) {
	ci := sample()
	c := Codec{Secret: []byte("k")}
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		p, _ := ci.MarshalBinary()
		buf, _ = c.Append(buf[:0], Frame{Type: TypeRequest, ConnMagic: ci.ConnMagic(), Payload: p})
	}
}

func BenchmarkDecodeRequest(b *testing.B) {
	ci := sample()
	p, _ := ci.MarshalBinary()
	c := Codec{Secret: []byte("k")}
	frame, _ := c.Append(nil, Frame{Type: TypeRequest, Payload: p})
	b.ReportAllocs()
	for b.Loop() {
		f, err := c.Read(bytes.NewReader(frame))
		if err != nil {
			b.Fatal(err)
		}
		var out ConnInfo
		if err := out.UnmarshalBinary(f.Payload); err != nil {
			b.Fatal(err)
		}
	}
}
