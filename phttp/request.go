// Package phttp reads just enough of an HTTP/1.x request to schedule it: the
// request line and the end of the header block, with a bound on size. It
// does not consume anything it does not return: every byte read is handed on
// (to a BE's receive queue or the local node), so the server sees the
// original request untouched (seed 4.2.2, "HTTP request zero copy relay").
package phttp

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Request is the head of one HTTP request.
type Request struct {
	Method string
	Target string // as sent: origin-form "/a?b" or absolute-form "http://h/a"
	Path   string // the path the rules match (RoutePath): decoded, normalised, no query
	Host   string // the host `host=` rules match (RouteHost): lowercase, no port
	Proto  string
	// Raw is every byte read from the connection, header and any body bytes
	// that arrived with it, in order.
	Raw []byte
	// HeaderLen is the length of the header block within Raw.
	HeaderLen int
	// Head is the parsed head, with its framing.
	Head *Head
}

// Errors the FE answers with an HTTP status before closing.
var (
	ErrHeaderTooLarge = errors.New("request header too large")
	ErrMalformed      = errors.New("malformed request")
)

// Status is the HTTP status an FE answers a read error with, or 0 when the
// right answer is to close silently (the client sent nothing, or went away).
func Status(err error) int {
	switch {
	case errors.Is(err, ErrHeaderTooLarge):
		return 431
	case errors.Is(err, ErrMalformed), errors.Is(err, ErrFraming):
		return 400
	}
	return 0
}

// Read reads one request head from r, reading at most max bytes. The caller
// bounds the time with a read deadline.
func Read(r io.Reader, max int) (*Request, error) {
	req, _, err := ReadFrom(r, nil, max)
	return req, err
}

// ReadFrom is Read for a head whose first bytes, prefix, were read before
// (by an agent that handed the connection over). On an error it also
// returns the bytes read so far, prefix included.
func ReadFrom(r io.Reader, prefix []byte, limit int) (*Request, []byte, error) {
	buf := make([]byte, 0, min(limit, max(4096, len(prefix))))
	buf = append(buf, prefix...)
	for {
		if req, err := parse(buf); !errors.Is(err, ErrIncomplete) {
			return req, buf, err
		}
		if len(buf) >= limit {
			return nil, buf, fmt.Errorf("%w: no end of header within %d bytes", ErrHeaderTooLarge, limit)
		}
		// A request line that is already wrong need not be read to its end.
		if err := checkPrefix(buf); err != nil {
			return nil, buf, err
		}
		if len(buf) == cap(buf) {
			nb := make([]byte, len(buf), min(limit, 2*cap(buf)))
			copy(nb, buf)
			buf = nb
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil {
			if req, perr := parse(buf); !errors.Is(perr, ErrIncomplete) {
				return req, buf, perr
			}
			if len(buf) > 0 && errors.Is(err, io.EOF) {
				return nil, buf, fmt.Errorf("%w: connection closed inside the header", ErrMalformed)
			}
			return nil, buf, err
		}
	}
}

// headerEnd returns the length of the header block including its blank line,
// or 0 if it is not complete yet. Bare LF line ends are accepted (RFC 9112
// section 2.2).
func headerEnd(b []byte) int {
	i := bytes.Index(b, []byte("\n\r\n"))
	j := bytes.Index(b, []byte("\n\n"))
	switch {
	case i >= 0 && (j < 0 || i < j):
		return i + 3
	case j >= 0:
		return j + 2
	}
	return 0
}

func checkPrefix(b []byte) error {
	skip, err := emptyLines(b)
	if err != nil {
		return err
	}
	b = b[skip:]
	line := b
	if i := bytes.IndexByte(b, '\n'); i >= 0 {
		line = b[:i]
	}
	for _, c := range line {
		if c < 0x20 && c != '\r' && c != '\t' || c == 0x7f {
			return fmt.Errorf("%w: control byte 0x%02x in request line", ErrMalformed, c)
		}
	}
	if sp := bytes.IndexByte(line, ' '); sp >= 0 && !isToken(string(line[:sp])) {
		return fmt.Errorf("%w: bad method %q", ErrMalformed, line[:sp])
	}
	return nil
}

// parse parses the head at the start of buf, ErrIncomplete while there is
// no whole head.
func parse(buf []byte) (*Request, error) {
	h, err := ParseRequest(buf)
	if err != nil {
		return nil, err
	}
	return &Request{Method: h.Method, Target: h.Target, Path: h.Path, Host: h.Host, Proto: h.Proto, Raw: buf, HeaderLen: h.Len, Head: h}, nil
}

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

func trunc(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// ErrorResponse is the complete HTTP/1.1 answer the FE sends for status
// before it closes the connection.
func ErrorResponse(status int, why string) []byte {
	text := map[int]string{400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
		502: "Bad Gateway", 503: "Service Unavailable"}[status]
	body := fmt.Sprintf("%d %s: %s\n", status, text, why)
	return fmt.Appendf(nil, "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\nServer: tcpha\r\n\r\n%s",
		status, text, len(body), body)
}
