package tlshello

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

// A case's input and what Read must make of it.
type readCase struct {
	name    string
	in      []byte
	r       func([]byte) io.Reader // how the input arrives; nil: one bytes.Reader
	limit   int                    // 0: Max
	reason  Reason
	sni     string
	alpn    []string
	vers    uint16 // 0: not checked
	records int    // 0: not checked
	// rawLen is how much of in is the ClientHello's records (0: all of it).
	rawLen int
}

func oneByte(b []byte) io.Reader { return iotest.OneByteReader(bytes.NewReader(b)) }

func readCases(t testing.TB) []readCase {
	tls13 := []uint16{tls.VersionTLS13, tls.VersionTLS12}
	full := helloSpec{names: []string{"www.example.com"}, alpn: []string{"h2", "http/1.1"}, versions: tls13, keyShare: true}.build()
	goFull := goHello(t, &tls.Config{ServerName: "WWW.Example.com", NextProtos: []string{"h2", "http/1.1"}})
	big := helloSpec{names: []string{"big.example"}, pad: 17 << 10}.build()
	rec := func(b ...byte) []byte { return b }
	h2h1 := []string{"h2", "http/1.1"}
	return []readCase{
		{name: "go TLS 1.3, SNI upper-case, ALPN", in: goFull, sni: "www.example.com", alpn: []string{"h2", "http/1.1"}, vers: tls.VersionTLS13, records: 1},
		{name: "go, no SNI", in: goHello(t, &tls.Config{InsecureSkipVerify: true}), vers: tls.VersionTLS13},
		{name: "go, IP address: no SNI sent", in: goHello(t, &tls.Config{ServerName: "192.0.2.1"})},
		{name: "go TLS 1.2 only", in: goHello(t, &tls.Config{ServerName: "a.example", MaxVersion: tls.VersionTLS12}), sni: "a.example", vers: tls.VersionTLS12},
		{name: "go, split across 3 records", in: records(goFull[5:], 100, 200, 0), sni: "www.example.com", alpn: []string{"h2", "http/1.1"}, records: 3},
		{name: "go, 1-byte segments", in: goFull, r: oneByte, sni: "www.example.com", alpn: h2h1, records: 1},
		{name: "records of 7 bytes in 1-byte segments", in: records(full, 7), r: oneByte, sni: "www.example.com", alpn: h2h1, records: (len(full) + 6) / 7},
		{name: "message header split across records", in: records(full, 1, 2, 1, 0), sni: "www.example.com", alpn: h2h1, records: 4},
		{name: "TLS 1.3 key_share and GREASE", in: records(helloSpec{names: []string{"g.example"}, alpn: []string{"h2"}, versions: tls13, keyShare: true, grease: true}.build()),
			sni: "g.example", alpn: []string{"h2"}, vers: tls.VersionTLS13},
		{name: "no SNI, no ALPN", in: records(helloSpec{versions: tls13, keyShare: true}.build()), vers: tls.VersionTLS13},
		{name: "ALPN without SNI", in: records(helloSpec{alpn: []string{"http/1.1"}}.build()), alpn: []string{"http/1.1"}, vers: tls.VersionTLS12},
		{name: "no extensions at all", in: records(helloSpec{noExt: true}.build()), vers: tls.VersionTLS12},
		{name: "SNI IPv4 literal: no SNI", in: records(helloSpec{names: []string{"10.1.2.3"}}.build())},
		{name: "SNI IPv6 literal: no SNI", in: records(helloSpec{names: []string{"[2001:db8::1]"}}.build())},
		{name: "another name type beside host_name", in: records(helloSpec{extra: [][2][]byte{{{0, 0}, sniEntries(1, "opaque", 0, "N.example")}}}.build()), sni: "n.example"},
		{name: "only another name type", in: records(helloSpec{extra: [][2][]byte{{{0, 0}, sniEntries(7, "x")}}}.build())},
		{name: "underscore and digits", in: records(helloSpec{names: []string{"_srv.x-1.example"}}.build()), sni: "_srv.x-1.example"},
		{name: "data after the records is not read", in: append(slices.Clone(goFull), 23, 3, 3, 0, 1, 'x'), rawLen: len(goFull), sni: "www.example.com", alpn: h2h1},
		{name: "bytes after the message in its record", in: records(append(slices.Clone(full), 2, 0, 0, 0)), sni: "www.example.com", alpn: h2h1},
		{name: "records that take 16 KiB exactly", in: records(helloSpec{names: []string{"e.example"}, pad: Max - 5 - len(helloSpec{names: []string{"e.example"}}.build()) - 4}.build()), sni: "e.example"},

		{name: "empty", in: nil, reason: ReasonEmpty},
		{name: "truncated record", in: goFull[:100], reason: ReasonTruncated},
		{name: "truncated header", in: goFull[:3], reason: ReasonTruncated},
		{name: "truncated between records", in: records(full, 50)[:55], reason: ReasonTruncated},
		{name: "oversized: a 17 KiB hello", in: records(big, 1<<14), reason: ReasonOversized},
		{name: "oversized: declared length", in: records(big[:200]), reason: ReasonOversized},
		{name: "oversized: record headers count", in: records(full, 1), limit: len(full) * 3, reason: ReasonOversized},
		{name: "limit below a record header", in: goFull, limit: 4, reason: ReasonOversized},
		{name: "record overflow", in: append(rec(22, 3, 1, 0x40, 1), big[:1<<14+1]...), limit: 32 << 10, reason: ReasonRecordOverflow},
		{name: "SSLv2-compatible hello", in: rec(0x80, 0x2e, 1, 3, 1, 0, 0x15, 0, 0, 0, 0x10), reason: ReasonSSLv2},
		{name: "SSL 2.0-only hello", in: rec(0x80, 0x81, 1, 0, 2), reason: ReasonSSLv2},
		{name: "HTTP GET", in: []byte("GET / HTTP/1.1\r\nHost: a\r\n\r\n"), reason: ReasonHTTP},
		{name: "HTTP DELETE in 1-byte segments", in: []byte("DELETE /x HTTP/1.1\r\n\r\n"), r: oneByte, reason: ReasonHTTP},
		{name: "HTTP/2 preface", in: []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), reason: ReasonHTTP},
		{name: "SSH banner", in: []byte("SSH-2.0-OpenSSH_9.2\r\n"), reason: ReasonGarbage},
		{name: "zeros", in: make([]byte, 64), reason: ReasonGarbage},
		{name: "garbage after one byte", in: rec(0x01), reason: ReasonGarbage},
		{name: "alert first", in: rec(21, 3, 1, 0, 2, 2, 40), reason: ReasonAlert},
		{name: "alert between fragments", in: append(records(full, 20)[:25], 21, 3, 3, 0, 2, 1, 0), reason: ReasonAlert},
		{name: "change_cipher_spec first", in: rec(20, 3, 3, 0, 1, 1), reason: ReasonUnexpected},
		{name: "application data first", in: rec(23, 3, 3, 0, 3, 1, 2, 3), reason: ReasonUnexpected},
		{name: "application data between fragments", in: append(records(full, 20)[:25], 23, 3, 3, 0, 1, 0), reason: ReasonUnexpected},
		{name: "server hello", in: records(append([]byte{2}, full[1:]...)), reason: ReasonUnexpected},
		{name: "record version 2.0", in: append(rec(22, 2, 0, byte(len(full)>>8), byte(len(full))), full...), reason: ReasonVersion},
		{name: "record type with a bad version", in: rec(23, 0x47, 0x45, 0x54, 0x20), reason: ReasonGarbage},
		{name: "empty handshake record", in: rec(22, 3, 1, 0, 0, 22, 3, 1, 0, 4, 1, 0, 0, 0), reason: ReasonMalformed},
		{name: "message shorter than its fields", in: records([]byte{1, 0, 0, 3, 3, 3, 0}), reason: ReasonMalformed},
		{name: "odd cipher suites", in: records(oddSuites(full)), reason: ReasonMalformed},
		{name: "trailing dot", in: records(helloSpec{names: []string{"a.example."}}.build()), reason: ReasonMalformed},
		{name: "two host_names", in: records(helloSpec{names: []string{"a.example", "b.example"}}.build()), reason: ReasonMalformed},
		{name: "two server_name extensions", in: records(helloSpec{names: []string{"a.example"}, extra: [][2][]byte{{{0, 0}, sniBody("b.example")}}}.build()), reason: ReasonMalformed},
		{name: "empty ALPN name", in: records(helloSpec{alpn: []string{"h2", ""}}.build()), reason: ReasonMalformed},
		{name: "SNI with a space", in: records(helloSpec{names: []string{"a b.example"}}.build()), reason: ReasonBadSNI},
		{name: "SNI with a NUL", in: records(helloSpec{names: []string{"a.example\x00.evil"}}.build()), reason: ReasonBadSNI},
		{name: "SNI with an empty label", in: records(helloSpec{names: []string{"a..example"}}.build()), reason: ReasonBadSNI},
		{name: "SNI label of 64", in: records(helloSpec{names: []string{strings.Repeat("a", 64) + ".example"}}.build()), reason: ReasonBadSNI},
		{name: "SNI of 254 bytes", in: records(helloSpec{names: []string{strings.Repeat("abcdefg.", 31) + "abcdef"}}.build()), reason: ReasonBadSNI},
		{name: "SNI UTF-8", in: records(helloSpec{names: []string{"bücher.example"}}.build()), reason: ReasonBadSNI},
	}
}

// oddSuites gives a built hello's cipher suite list an odd length.
func oddSuites(msg []byte) []byte {
	m := slices.Clone(msg)
	off := 4 + 2 + 32 + 1 + int(m[4+2+32])
	m[off+1]-- // the list's length, low byte
	return m
}

func sniBody(name string) []byte { return sniEntries(nameTypeHostName, name) }

// sniEntries is a server_name extension's body with the given (type,
// name) entries, type and name alternating.
func sniEntries(entries ...any) []byte {
	var list []byte
	for i := 0; i < len(entries); i += 2 {
		typ, name := entries[i].(int), entries[i+1].(string)
		list = append(list, byte(typ), byte(len(name)>>8), byte(len(name)))
		list = append(list, name...)
	}
	return append([]byte{byte(len(list) >> 8), byte(len(list))}, list...)
}

func TestRead(t *testing.T) {
	for _, c := range readCases(t) {
		t.Run(c.name, func(t *testing.T) {
			limit := c.limit
			if limit == 0 {
				limit = Max
			}
			var r io.Reader = bytes.NewReader(c.in)
			if c.r != nil {
				r = c.r(c.in)
			}
			cr := &counting{r: r}
			h, err := Read(cr, limit)
			if got := ReasonOf(err); got != c.reason {
				t.Fatalf("reason %v, want %v (err %v)", got, c.reason, err)
			}
			if cr.n > limit {
				t.Errorf("read %d bytes, limit %d", cr.n, limit)
			}
			if err != nil {
				var e *Error
				if !errors.As(err, &e) || h != nil {
					t.Errorf("error %T %v with hello %v", err, err, h)
				}
				return
			}
			rawLen := c.rawLen
			if rawLen == 0 {
				rawLen = len(c.in)
			}
			if !bytes.Equal(h.Raw, c.in[:rawLen]) || cr.n != rawLen {
				t.Errorf("raw %d bytes (read %d), want the first %d of the input", len(h.Raw), cr.n, rawLen)
			}
			if h.SNI != c.sni || !slices.Equal(h.ALPN, c.alpn) {
				t.Errorf("SNI %q ALPN %q, want %q %q", h.SNI, h.ALPN, c.sni, c.alpn)
			}
			if c.vers != 0 && h.Version != c.vers {
				t.Errorf("version %#x, want %#x", h.Version, c.vers)
			}
			if c.records != 0 && h.Records != c.records {
				t.Errorf("%d records, want %d", h.Records, c.records)
			}
		})
	}
}

// What Read accepts, crypto/tls's server accepts with the same name
// (lower-cased; an IP literal is no name here). What Read refuses and
// crypto/tls parses is refused on purpose: a name that is no DNS name, a
// record version that is not 3.x, more than the bound.
func TestSameAsCryptoTLS(t *testing.T) {
	for _, c := range readCases(t) {
		if c.limit != 0 {
			continue
		}
		goName, parsed := goServerName(c.in)
		h, err := Read(bytes.NewReader(c.in), Max)
		switch {
		case err == nil && parsed:
			if want := strings.ToLower(goName); h.SNI != want && !(h.SNI == "" && isIPLiteral([]byte(goName))) {
				t.Errorf("%s: SNI %q, crypto/tls %q", c.name, h.SNI, goName)
			}
		case err == nil:
			t.Errorf("%s: accepted, crypto/tls does not parse it", c.name)
		case parsed && !deliberate(ReasonOf(err)):
			t.Errorf("%s: refused (%v), crypto/tls parses it with name %q", c.name, err, goName)
		}
	}
}

// deliberate are the reasons Read refuses a ClientHello crypto/tls would
// parse.
func deliberate(r Reason) bool {
	switch r {
	case ReasonBadSNI, ReasonVersion, ReasonOversized, ReasonAlert:
		return true
	}
	return false
}

// The hellos of real clients: OpenSSL's s_client and curl.
func TestCaptures(t *testing.T) {
	want := map[string]struct {
		sni  string
		alpn []string
		vers uint16
	}{
		"openssl-sni-alpn.bin":     {"www.example.com", []string{"h2", "http/1.1"}, tls.VersionTLS13},
		"openssl-noservername.bin": {"", nil, tls.VersionTLS13},
		"openssl-tls12.bin":        {"a.example", nil, tls.VersionTLS12},
		"curl-http2.bin":           {"a.example", []string{"h2", "http/1.1"}, tls.VersionTLS13},
	}
	for name, b := range captures(t) {
		w, ok := want[name]
		if !ok {
			t.Errorf("%s: no expectation", name)
			continue
		}
		h, err := Read(oneByte(b), Max)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		goName, parsed := goServerName(b)
		if !parsed || strings.ToLower(goName) != h.SNI {
			t.Errorf("%s: crypto/tls parsed %v name %q, Read %q", name, parsed, goName, h.SNI)
		}
		if h.SNI != w.sni || !slices.Equal(h.ALPN, w.alpn) || h.Version != w.vers || !bytes.Equal(h.Raw, b) {
			t.Errorf("%s: SNI %q ALPN %q version %#x raw %d/%d, want %q %q %#x", name, h.SNI, h.ALPN, h.Version, len(h.Raw), len(b), w.sni, w.alpn, w.vers)
		}
	}
}

func TestAlert(t *testing.T) {
	for _, c := range []struct {
		reason Reason
		alert  byte // 0: none
	}{
		{ReasonTimeout, 0}, {ReasonEmpty, 0}, {ReasonTruncated, 0}, {ReasonHTTP, 0}, {ReasonGarbage, 0}, {ReasonAlert, 0},
		{ReasonSSLv2, AlertProtocolVersion}, {ReasonUnexpected, AlertUnexpectedMessage}, {ReasonVersion, AlertProtocolVersion},
		{ReasonRecordOverflow, AlertRecordOverflow}, {ReasonOversized, AlertIllegalParameter}, {ReasonMalformed, AlertDecodeError},
		{ReasonBadSNI, AlertUnrecognizedName},
	} {
		err := error(&Error{Reason: c.reason})
		got := Alert(err)
		if c.alert == 0 {
			if got != nil {
				t.Errorf("%v: alert % x, want none", c.reason, got)
			}
			continue
		}
		if want := []byte{21, 3, 1, 0, 2, 2, c.alert}; !bytes.Equal(got, want) {
			t.Errorf("%v: alert % x, want % x", c.reason, got, want)
		}
	}
	if Alert(nil) != nil || Alert(io.EOF) != nil {
		t.Error("an alert for no refusal")
	}
	// Every reason has a label, and the labels are distinct.
	seen := map[string]bool{}
	for _, r := range append(Reasons(), ReasonNone) {
		s := r.String()
		if s == "" || strings.Contains(s, "(") || seen[s] {
			t.Errorf("reason %d: label %q", r, s)
		}
		seen[s] = true
	}
}

// crypto/tls's client reads the alert as the server's refusal.
func TestAlertReadByCryptoTLS(t *testing.T) {
	c := &fakeConn{r: bytes.NewReader(Alert(&Error{Reason: ReasonBadSNI}))}
	err := tls.Client(c, &tls.Config{ServerName: "a.example"}).Handshake()
	if err == nil || !strings.Contains(err.Error(), "unrecognized name") {
		t.Errorf("client saw %v", err)
	}
}

// Plain HTTP on the TLS port gets an HTTP answer that says so.
func TestReplyHTTP(t *testing.T) {
	_, err := Read(strings.NewReader("GET / HTTP/1.1\r\n\r\n"), Max)
	got := string(Reply(err))
	if !strings.HasPrefix(got, "HTTP/1.1 400 ") || !strings.Contains(got, "HTTPS port") {
		t.Errorf("reply %q", got)
	}
	_, err = Read(bytes.NewReader([]byte{21, 3, 1, 0, 2, 2, 40}), Max)
	if Reply(err) != nil {
		t.Errorf("reply to an alert: %q", Reply(err))
	}
	_, err = Read(bytes.NewReader(records([]byte{2, 0, 0, 0})), Max)
	if !bytes.Equal(Reply(err), AlertRecord(AlertUnexpectedMessage)) {
		t.Errorf("reply to a ServerHello: % x", Reply(err))
	}
}

// A client that stops inside its hello meets the caller's read deadline:
// ReasonTimeout, once, at about the deadline.
func TestDeadline(t *testing.T) {
	hello := goHello(t, &tls.Config{ServerName: "slow.example"})
	for _, sent := range []int{0, 3, 50} {
		client, server := net.Pipe()
		go func() {
			client.Write(hello[:sent])
			time.Sleep(2 * time.Second)
			client.Close()
		}()
		server.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		start := time.Now()
		_, err := Read(server, Max)
		if ReasonOf(err) != ReasonTimeout || !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("after %d bytes: %v", sent, err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("after %d bytes: returned after %v", sent, d)
		}
		server.Close()
	}
}

// Over loopback TCP, a hello in three segments and two records (the
// issue's acceptance case) is read whole and only it: the request that
// follows stays in the socket.
func TestLoopbackSegments(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	msg := helloSpec{names: []string{"seg.example"}, alpn: []string{"h2"}, versions: []uint16{tls.VersionTLS13}, keyShare: true}.build()
	in := records(msg, 60, 0)
	cuts := []int{3, 70, len(in)} // inside the first header, inside the second record, the end
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return
		}
		defer c.Close()
		c.(*net.TCPConn).SetNoDelay(true)
		prev := 0
		for _, cut := range cuts {
			c.Write(in[prev:cut])
			prev = cut
			time.Sleep(20 * time.Millisecond)
		}
		c.Write([]byte("after"))
		time.Sleep(time.Second)
	}()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	h, err := Read(c, Max)
	if err != nil {
		t.Fatal(err)
	}
	if h.SNI != "seg.example" || h.Records != 2 || !bytes.Equal(h.Raw, in) {
		t.Errorf("SNI %q records %d raw %d/%d", h.SNI, h.Records, len(h.Raw), len(in))
	}
	rest := make([]byte, 5)
	if _, err := io.ReadFull(c, rest); err != nil || string(rest) != "after" {
		t.Errorf("after the hello: %q %v", rest, err)
	}
}

// A reader that returns nothing and no error forever is given up on.
func TestNoProgress(t *testing.T) {
	_, err := Read(zeroReader{}, Max)
	if ReasonOf(err) != ReasonEmpty || !errors.Is(err, io.ErrNoProgress) {
		t.Errorf("%v", err)
	}
}

type zeroReader struct{}

func (zeroReader) Read([]byte) (int, error) { return 0, nil }
