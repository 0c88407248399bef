package tlshello

import (
	"bytes"
	"crypto/tls"
	"testing"
)

// BenchmarkRead reads real ClientHellos: crypto/tls's (about 1.5 KiB, with
// its X25519MLKEM768 key share), curl's, and crypto/tls's cut into records
// of 100 bytes arriving in reads of 64.
func BenchmarkRead(b *testing.B) {
	goFull := goHello(b, &tls.Config{ServerName: "www.example.com", NextProtos: []string{"h2", "http/1.1"}})
	for _, c := range []struct {
		name string
		in   []byte
		seg  int
	}{
		{"go", goFull, 0},
		{"curl", captures(b)["curl-http2.bin"], 0},
		{"go-100B-records-64B-reads", records(goFull[5:], 100), 64},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(c.in)))
			r := bytes.NewReader(nil)
			s := &segments{}
			for b.Loop() {
				var h *Hello
				var err error
				if c.seg == 0 {
					r.Reset(c.in)
					h, err = Read(r, Max)
				} else {
					s.b, s.n = c.in, c.seg
					h, err = Read(s, Max)
				}
				if err != nil || h.SNI != "www.example.com" && h.SNI != "a.example" {
					b.Fatal(h, err)
				}
			}
		})
	}
}
