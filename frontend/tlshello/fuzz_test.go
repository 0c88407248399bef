package tlshello

import (
	"bytes"
	"crypto/tls"
	"errors"
	"strings"
	"testing"
)

// FuzzRead feeds a connection's first bytes, in reads of 1 to 32 bytes,
// with the default bound (lim 0) or a small one. Read never panics, never
// reads past the bound, and on success reads exactly the records it
// returns, a prefix of the input, with a routable lower-case name or none.
// With the default bound it agrees with crypto/tls's server: what it
// accepts and crypto/tls parses has crypto/tls's name, and what crypto/tls
// parses it refuses only on purpose (deliberate).
func FuzzRead(f *testing.F) {
	for _, b := range captures(f) {
		f.Add(b, uint8(0), uint16(0))
	}
	for _, c := range readCases(f) {
		if len(c.in) < 4096 {
			f.Add(c.in, uint8(4), uint16(c.limit))
		}
	}
	f.Add(goHello(f, &tls.Config{ServerName: "f.example", NextProtos: []string{"h2"}}), uint8(6), uint16(0))
	f.Fuzz(func(t *testing.T, b []byte, seg uint8, lim uint16) {
		limit := Max
		if lim != 0 {
			limit = int(lim)
		}
		cr := &counting{r: &segments{b: b, n: int(seg)%32 + 1}}
		h, err := Read(cr, limit)
		if cr.n > limit {
			t.Fatalf("read %d bytes, limit %d", cr.n, limit)
		}
		if err != nil {
			var e *Error
			if !errors.As(err, &e) || h != nil || e.Reason == ReasonNone || e.Reason >= numReasons {
				t.Fatalf("refusal %T %v, hello %v", err, err, h)
			}
			if a := Alert(err); a != nil && (len(a) != 7 || a[0] != recordAlert || a[5] != 2) {
				t.Fatalf("alert % x", a)
			}
			if lim == 0 && !deliberate(e.Reason) {
				if name, parsed := goServerName(b); parsed {
					t.Fatalf("refused (%v), crypto/tls parses it with name %q", err, name)
				}
			}
			return
		}
		if len(h.Raw) != cr.n || !bytes.Equal(h.Raw, b[:len(h.Raw)]) || h.Records < 1 {
			t.Fatalf("raw %d bytes of %d read, %d records", len(h.Raw), cr.n, h.Records)
		}
		if h.SNI != "" && (!isDNSName([]byte(h.SNI)) || strings.ToLower(h.SNI) != h.SNI) {
			t.Fatalf("SNI %q", h.SNI)
		}
		if lim == 0 {
			if name, parsed := goServerName(b); parsed && h.SNI != strings.ToLower(name) && !(h.SNI == "" && isIPLiteral([]byte(name))) {
				t.Fatalf("SNI %q, crypto/tls %q", h.SNI, name)
			}
		}
	})
}
