package phttp

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"testing/iotest"
)

func TestRead(t *testing.T) {
	cases := []struct {
		name, in   string
		path       string
		headerLen  int
		wantErr    error
		wantStatus int
	}{
		{"simple", "GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n", "/index.html", 37, nil, 0},
		{"query stripped", "GET /img/a.jpg?v=2 HTTP/1.1\r\nHost: x\r\n\r\n", "/img/a.jpg", 40, nil, 0},
		{"absolute form", "GET http://h/a/b.png HTTP/1.1\r\n\r\n", "/a/b.png", 33, nil, 0},
		{"escaped path decoded", "GET /a%20b.jpg HTTP/1.0\r\n\r\n", "/a b.jpg", 27, nil, 0},
		{"bare LF", "GET /x HTTP/1.1\nHost: y\n\n", "/x", 25, nil, 0},
		{"body bytes kept", "POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", "/p", 39, nil, 0},
		{"fragment not routed", "GET /index.html#.jpg HTTP/1.1\r\n\r\n", "/index.html", 33, nil, 0},
		{"dot segments removed", "GET /x/../img/a.jpg HTTP/1.1\r\n\r\n", "/img/a.jpg", 32, nil, 0},
		{"climbing out of a prefix", "GET /img/../secret HTTP/1.1\r\n\r\n", "/secret", 31, nil, 0},
		{"above the root", "GET /../etc/passwd HTTP/1.1\r\n\r\n", "", 0, ErrMalformed, 400},
		{"bad escape", "GET /a%zz HTTP/1.1\r\n\r\n", "", 0, ErrMalformed, 400},
		{"after CRLF", "\r\nGET /x HTTP/1.1\r\nHost: y\r\n\r\n", "/x", 30, nil, 0},
		{"after bare LF", "\nGET /x HTTP/1.1\nHost: y\n\n", "/x", 26, nil, 0},
		{"too many empty lines", "\r\n\r\n\r\n\r\n\r\n", "", 0, ErrMalformed, 400},
		{"garbage", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "", 0, ErrMalformed, 400},
		{"two fields", "GET /\r\n\r\n", "", 0, ErrMalformed, 400},
		{"bad proto", "GET / SPDY/3\r\n\r\n", "", 0, ErrMalformed, 400},
		{"bad method", "G(T / HTTP/1.1\r\n\r\n", "", 0, ErrMalformed, 400},
		{"bad header", "GET / HTTP/1.1\r\nno colon here\r\n\r\n", "", 0, ErrMalformed, 400},
		{"asterisk-form OPTIONS", "OPTIONS * HTTP/1.1\r\n\r\n", "*", 22, nil, 0},
		{"asterisk-form GET", "GET * HTTP/1.1\r\n\r\n", "", 0, ErrMalformed, 400},
		{"smuggling", "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "", 0, ErrFraming, 400},
		{"too large", "GET /" + strings.Repeat("a", 600) + " HTTP/1.1\r\n\r\n", "", 0, ErrHeaderTooLarge, 431},
		{"closed inside header", "GET / HTTP/1.1\r\nHost:", "", 0, ErrMalformed, 400},
		{"nothing sent", "", "", 0, io.EOF, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// One byte at a time, so the header end is found across reads.
			req, err := Read(iotest.OneByteReader(strings.NewReader(tc.in)), 512)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if Status(err) != tc.wantStatus {
					t.Errorf("status = %d, want %d", Status(err), tc.wantStatus)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if req.Path != tc.path || req.HeaderLen != tc.headerLen {
				t.Errorf("path %q headerLen %d, want %q %d", req.Path, req.HeaderLen, tc.path, tc.headerLen)
			}
			if !bytes.HasPrefix([]byte(tc.in), req.Raw) {
				t.Errorf("raw %q is not a prefix of the input", req.Raw)
			}
		})
	}
}

// Raw must hold every byte read, so nothing is lost when the connection moves.
func TestReadKeepsPipelined(t *testing.T) {
	in := "GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"
	req, err := Read(strings.NewReader(in), 4096)
	if err != nil {
		t.Fatal(err)
	}
	if string(req.Raw) != in || req.Path != "/1" {
		t.Errorf("raw %q path %q", req.Raw, req.Path)
	}
}

func TestErrorResponseParses(t *testing.T) {
	for _, code := range []int{400, 408, 431, 503} {
		resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(ErrorResponse(code, "why"))), nil)
		if err != nil {
			t.Fatalf("%d: %v", code, err)
		}
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != code || !resp.Close || !strings.Contains(string(body), "why") {
			t.Errorf("%d: status %d close %v body %q", code, resp.StatusCode, resp.Close, body)
		}
	}
}

func FuzzRead(f *testing.F) {
	f.Add([]byte("GET /a.jpg HTTP/1.1\r\nHost: x\r\n\r\n"))
	f.Add([]byte("\x00\x01"))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := Read(bytes.NewReader(b), 1024)
		if err != nil {
			return
		}
		if !bytes.Equal(req.Raw, b[:len(req.Raw)]) || req.HeaderLen > len(req.Raw) || req.Path == "" {
			t.Fatalf("inconsistent request %+v", req)
		}
	})
}

// A head an agent began reading and handed over goes on from its prefix;
// an error returns what was read so far, for the next handover.
func TestReadFromPrefix(t *testing.T) {
	req, _, err := ReadFrom(strings.NewReader("TP/1.1\r\nHost: a\r\n\r\nbody"), []byte("GET /a?x HT"), 8192)
	if err != nil {
		t.Fatal(err)
	}
	if req.Path != "/a" || string(req.Raw) != "GET /a?x HTTP/1.1\r\nHost: a\r\n\r\nbody" {
		t.Errorf("path %q raw %q", req.Path, req.Raw)
	}
	_, got, err := ReadFrom(iotest.TimeoutReader(strings.NewReader("Host")), []byte("GET / HTTP/1.1\r\n"), 8192)
	if err == nil || string(got) != "GET / HTTP/1.1\r\nHost" {
		t.Errorf("after an error: %q %v", got, err)
	}
	if _, _, err := ReadFrom(strings.NewReader(""), []byte(strings.Repeat("a", 100)), 64); Status(err) != 431 {
		t.Errorf("prefix over the limit: %v", err)
	}
}
