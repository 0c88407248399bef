package phttp

import (
	"bytes"
	"testing"
)

func BenchmarkRead(b *testing.B) {
	req := []byte("GET /img/photos/2026/a.jpg?size=large HTTP/1.1\r\nHost: www.example.com\r\n" +
		"User-Agent: curl/7.88.1\r\nAccept: */*\r\nAccept-Encoding: gzip\r\n\r\n")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Read(bytes.NewReader(req), 8192); err != nil {
			b.Fatal(err)
		}
	}
}
