package phttp

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestParseRequestFraming(t *testing.T) {
	cases := []struct {
		name, head string
		body       BodyKind
		length     int64
		keepAlive  bool
		connClose  bool
		err        error
	}{
		{"get 1.1", "GET /a HTTP/1.1\r\nHost: x\r\n\r\n", BodyNone, 0, true, false, nil},
		{"get 1.0", "GET /a HTTP/1.0\r\n\r\n", BodyNone, 0, false, false, nil},
		{"1.0 keep-alive", "GET /a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", BodyNone, 0, true, false, nil},
		{"close", "GET /a HTTP/1.1\r\nConnection: close\r\n\r\n", BodyNone, 0, false, true, nil},
		{"close among others", "GET /a HTTP/1.1\r\nConnection: close, TE\r\n\r\n", BodyNone, 0, false, false, nil},
		{"two connection lines", "GET /a HTTP/1.1\r\nConnection: close\r\nConnection: close\r\n\r\n", BodyNone, 0, false, false, nil},
		{"post length", "POST /a HTTP/1.1\r\nContent-Length: 12\r\n\r\n", BodyLength, 12, true, false, nil},
		{"length 0", "POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n", BodyNone, 0, true, false, nil},
		{"repeated equal length", "POST /a HTTP/1.1\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n", BodyLength, 5, true, false, nil},
		{"chunked", "POST /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", BodyChunked, 0, true, false, nil},
		{"bare LF", "GET /a HTTP/1.1\nHost: x\n\n", BodyNone, 0, true, false, nil},
		{"differing lengths", "POST /a HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 0, 0, false, false, ErrFraming},
		{"length and chunked", "POST /a HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 0, 0, false, false, ErrFraming},
		{"chunked not last", "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 0, 0, false, false, ErrFraming},
		{"chunked twice", "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 0, 0, false, false, ErrFraming},
		{"negative length", "POST /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 0, 0, false, false, ErrFraming},
		{"plus length", "POST /a HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 0, 0, false, false, ErrFraming},
		{"hex length", "POST /a HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n", 0, 0, false, false, ErrFraming},
		{"TE in 1.0", "POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 0, 0, false, false, ErrFraming},
		{"obs-fold", "GET /a HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 0, 0, false, false, ErrMalformed},
		{"space before colon", "GET /a HTTP/1.1\r\nContent-Length : 5\r\n\r\n", 0, 0, false, false, ErrMalformed},
		{"NUL in value", "GET /a HTTP/1.1\r\nX: a\x00b\r\n\r\n", 0, 0, false, false, ErrMalformed},
		{"HTTP/2 line", "GET /a HTTP/2\r\n\r\n", 0, 0, false, false, ErrMalformed},
		{"incomplete", "GET /a HTTP/1.1\r\nHost: x\r\n", 0, 0, false, false, ErrIncomplete},
		// RFC 9112 section 2.2: empty lines before a request line are
		// ignored, a few of them, and are part of the head.
		{"after CRLF", "\r\nGET /a HTTP/1.1\r\nConnection: close\r\n\r\n", BodyNone, 0, false, true, nil},
		{"after bare LF", "\nGET /a HTTP/1.1\nConnection: close\n\n", BodyNone, 0, false, true, nil},
		{"after four empty lines", "\r\n\n\r\n\nPOST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n", BodyLength, 2, true, false, nil},
		{"after five empty lines", "\r\n\r\n\r\n\r\n\r\nGET /a HTTP/1.1\r\n\r\n", 0, 0, false, false, ErrMalformed},
		{"empty lines only", "\r\n\r\n", 0, 0, false, false, ErrIncomplete},
		{"empty line and a half", "\r\n\r", 0, 0, false, false, ErrIncomplete},
	}
	for _, tc := range cases {
		h, err := ParseRequest([]byte(tc.head + "NEXT"))
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("%s: err %v, want %v", tc.name, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if h.Body != tc.body || h.Length != tc.length || h.KeepAlive != tc.keepAlive || h.ConnClose != tc.connClose || h.Len != len(tc.head) {
			t.Errorf("%s: body %v/%d keepalive %v close %v len %d, want %v/%d %v %v %d",
				tc.name, h.Body, h.Length, h.KeepAlive, h.ConnClose, h.Len, tc.body, tc.length, tc.keepAlive, tc.connClose, len(tc.head))
		}
		if !strings.HasPrefix(tc.head[h.Start:], h.Method+" ") {
			t.Errorf("%s: request line at %d: %q", tc.name, h.Start, tc.head[h.Start:])
		}
		if line := tc.head[h.ConnLine[0]:h.ConnLine[1]]; h.ConnClose &&
			!strings.EqualFold(line, "Connection: close\r\n") && !strings.EqualFold(line, "Connection: close\n") {
			t.Errorf("%s: Connection line at %v is %q", tc.name, h.ConnLine, tc.head[h.ConnLine[0]:h.ConnLine[1]])
		}
	}
	h, _ := ParseRequest([]byte("PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"))
	if !h.Continue {
		t.Error("Expect: 100-continue not seen")
	}
	h, _ = ParseRequest([]byte("GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"))
	if !h.Upgrade || h.Path != "/ws" {
		t.Errorf("upgrade: %+v", h)
	}
}

func TestParseResponseFraming(t *testing.T) {
	cases := []struct {
		name, head, method string
		status             int
		body               BodyKind
		length             int64
		keepAlive          bool
		err                error
	}{
		{"length", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "GET", 200, BodyLength, 10, true, nil},
		{"HEAD ignores length", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD", 200, BodyNone, 0, true, nil},
		{"204", "HTTP/1.1 204 No Content\r\n\r\n", "GET", 204, BodyNone, 0, true, nil},
		{"304 with length", "HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", "GET", 304, BodyNone, 0, true, nil},
		{"100 continue", "HTTP/1.1 100 Continue\r\n\r\n", "PUT", 100, BodyNone, 0, true, nil},
		{"101", "HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", "GET", 101, BodyTunnel, 0, true, nil},
		{"CONNECT 200", "HTTP/1.1 200 OK\r\n\r\n", "CONNECT", 200, BodyTunnel, 0, true, nil},
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", 200, BodyChunked, 0, true, nil},
		{"gzip only: to close", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "GET", 200, BodyClose, 0, false, nil},
		{"no length: to close", "HTTP/1.1 200 OK\r\n\r\n", "GET", 200, BodyClose, 0, false, nil},
		{"length 0", "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "GET", 200, BodyNone, 0, true, nil},
		{"1.0 keep-alive", "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n", "GET", 200, BodyLength, 1, true, nil},
		{"server closes", "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n", "GET", 200, BodyLength, 1, false, nil},
		{"no reason phrase", "HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n", "GET", 404, BodyNone, 0, true, nil},
		{"bad status", "HTTP/1.1 2000 OK\r\n\r\n", "GET", 0, 0, 0, false, ErrMalformed},
		{"status 99", "HTTP/1.1 099 X\r\n\r\n", "GET", 0, 0, 0, false, ErrMalformed},
		{"length and chunked", "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", 0, 0, 0, false, ErrFraming},
	}
	for _, tc := range cases {
		h, err := ParseResponse([]byte(tc.head), tc.method)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("%s: err %v, want %v", tc.name, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if h.Status != tc.status || h.Body != tc.body || h.Length != tc.length || h.KeepAlive != tc.keepAlive {
			t.Errorf("%s: %d %v/%d keepalive %v, want %d %v/%d %v", tc.name, h.Status, h.Body, h.Length, h.KeepAlive,
				tc.status, tc.body, tc.length, tc.keepAlive)
		}
	}
}

// The scanner finds the same end however the body is cut into reads.
func TestChunksSplits(t *testing.T) {
	body := "4;ext=1\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n"
	data := body + "GET /next HTTP/1.1\r\n\r\n"
	for cut := 0; cut <= len(data); cut++ {
		for _, step := range []int{1, 3, 7, 1000} {
			var c Chunks
			total := 0
			done := false
			parts := []string{data[:cut], data[cut:]}
			for _, p := range parts {
				for len(p) > 0 && !done {
					k := min(step, len(p))
					n, d, err := c.Scan([]byte(p[:k]))
					if err != nil {
						t.Fatalf("cut %d step %d: %v", cut, step, err)
					}
					total += n
					done = d
					if d && n < k {
						break
					}
					p = p[n:]
					if d {
						break
					}
				}
				if done {
					break
				}
			}
			if !done || total != len(body) {
				t.Fatalf("cut %d step %d: done %v after %d bytes, want %d", cut, step, done, total, len(body))
			}
		}
	}
}

func TestChunksRejects(t *testing.T) {
	for name, b := range map[string]string{
		"no size":        "\r\n",
		"bad digit":      "4x\r\nWiki\r\n",
		"no CRLF after":  "4\r\nWikiX",
		"LF only":        "4\nWiki\r\n",
		"huge size":      "1000000000000000\r\n",
		"long extension": "1;" + strings.Repeat("a", maxChunkLine+10),
		"bad trailer":    "0\r\nX: y\n",
	} {
		var c Chunks
		if _, _, err := c.Scan([]byte(b)); !errors.Is(err, ErrFraming) {
			t.Errorf("%s: err %v, want ErrFraming", name, err)
		}
	}
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "GET http://a.B:1/ HTTP/1.1\r\nHost: WWW.x.:80\r\n\r\n", "POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
		"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseRequest(b)
		if err != nil {
			return
		}
		if h.Len <= 0 || h.Len > len(b) || h.Length < 0 || (h.Body == BodyLength) != (h.Length > 0) {
			t.Fatalf("inconsistent head %+v for %d bytes", h, len(b))
		}
		if h.Start < 0 || h.Start >= h.Len || !bytes.HasPrefix(b[h.Start:], []byte(h.Method+" ")) {
			t.Fatalf("request line at %d of a %d-byte head %q", h.Start, h.Len, b[:h.Len])
		}
		if h.ConnClose && (h.ConnLine[0] <= h.Start || h.ConnLine[1] > h.Len) {
			t.Fatalf("connection line %v outside head of %d", h.ConnLine, h.Len)
		}
		// The host rules see: lowercase, no port, no trailing dot, and
		// the same host when asked again.
		if h.Host != strings.ToLower(h.Host) || strings.HasSuffix(h.Host, ".") ||
			(strings.Contains(h.Host, ":") && !strings.HasPrefix(h.Host, "[")) {
			t.Fatalf("host %q", h.Host)
		}
		if again, err := RouteHost("/", h.Host); h.Host != "" && (err != nil || again != h.Host) {
			t.Fatalf("host %q routes again as %q, %v", h.Host, again, err)
		}
		if h.Body == BodyChunked {
			var c Chunks
			n, _, _ := c.Scan(b[h.Len:])
			if n > len(b)-h.Len {
				t.Fatalf("chunk scan consumed %d of %d", n, len(b)-h.Len)
			}
		}
	})
}

func FuzzParseResponse(f *testing.F) {
	for _, s := range []string{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "HTTP/1.1 204 No Content\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"} {
		f.Add([]byte(s), false)
	}
	f.Fuzz(func(t *testing.T, b []byte, head bool) {
		method := "GET"
		if head {
			method = "HEAD"
		}
		h, err := ParseResponse(b, method)
		if err != nil {
			return
		}
		if h.Status < 100 || h.Status > 599 || h.Len > len(b) {
			t.Fatalf("inconsistent head %+v", h)
		}
		if head && h.Body != BodyNone && h.Body != BodyTunnel {
			t.Fatalf("a HEAD response with a body: %v", h.Body)
		}
	})
}

func FuzzChunks(f *testing.F) {
	f.Add([]byte("4\r\nWiki\r\n0\r\n\r\n"), 3)
	f.Fuzz(func(t *testing.T, b []byte, step int) {
		step = max(1, step%64+1)
		var c Chunks
		total := 0
		for total < len(b) {
			k := min(step, len(b)-total)
			n, done, err := c.Scan(b[total : total+k])
			if n < 0 || n > k {
				t.Fatalf("scan consumed %d of %d", n, k)
			}
			total += n
			if err != nil || done {
				return
			}
		}
	})
}

// A scanner saved in the middle of a body and restored elsewhere finds the
// same end.
func TestChunksSaveRestore(t *testing.T) {
	body := "4\r\nWiki\r\n5\r\npedia\r\n0\r\nX: y\r\n\r\n"
	for cut := 0; cut < len(body); cut++ {
		var a Chunks
		n, done, err := a.Scan([]byte(body[:cut]))
		if err != nil || done {
			t.Fatalf("cut %d: %v %v", cut, err, done)
		}
		var b Chunks
		if err := b.Restore(a.Save()); err != nil {
			t.Fatal(err)
		}
		m, done, err := b.Scan([]byte(body[n:]))
		if err != nil || !done || n+m != len(body) {
			t.Fatalf("cut %d: resumed at %d, ended %v after %d more, %v", cut, n, done, m, err)
		}
	}
	var c Chunks
	if err := c.Restore(ChunksState{State: 200}); err == nil {
		t.Error("a bad state restored")
	}
}
