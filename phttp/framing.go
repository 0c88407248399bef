package phttp

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
)

// BodyKind is how a message's body is delimited (RFC 9112 section 6.3).
type BodyKind uint8

const (
	BodyNone    BodyKind = iota // no body
	BodyLength                  // Content-Length bytes
	BodyChunked                 // the chunked transfer coding, to its last chunk and trailers
	BodyClose                   // until the connection closes (responses only)
	BodyTunnel                  // raw bytes both ways from here on (101, CONNECT 2xx)
)

func (k BodyKind) String() string {
	return [...]string{"none", "length", "chunked", "close", "tunnel"}[k]
}

// Head is one request or response head.
type Head struct {
	// Request line (Status == 0) or status line.
	Method, Target string
	// Path is what the rules match: the target's path as nginx routes on
	// it (RoutePath); the target itself for CONNECT and `OPTIONS *`.
	Path string
	// Host is what `host=` rules match (RouteHost): the target's authority
	// or the Host header, lowercase, without port or trailing dot; empty
	// without one.
	Host string
	// XFFEnd is where the value of the request's last X-Forwarded-For
	// header ends within the head, 0 without one.
	XFFEnd int
	Status int
	Proto  string // "HTTP/1.1" or "HTTP/1.0"
	// Len is the head's length, up to and including its blank line.
	Len int
	// Start is where a request line starts within the head: after the
	// empty lines a client may send before it (RFC 9112 section 2.2),
	// which a relay need not pass on.
	Start int
	// Body is how the body that follows the head ends; Length is its size
	// for BodyLength.
	Body   BodyKind
	Length int64
	// KeepAlive says the sender allows another message on the connection
	// after this one (RFC 9112 section 9.3).
	KeepAlive bool
	// ConnClose says the head has exactly `Connection: close` (one header
	// line, one token): the one Connection header a relay may drop to keep
	// its own upstream connection open.
	ConnClose bool
	// Continue says the request expects 100-continue.
	Continue bool
	// Upgrade says the request asks for a protocol upgrade.
	Upgrade bool
	// ConnLine locates the Connection header line within the head
	// ([start, end), with its line end) when there is exactly one; zero
	// otherwise.
	ConnLine [2]int
}

// Framing errors: a request with one answers 400, a response 502.
var (
	ErrIncomplete = errors.New("incomplete head")
	ErrFraming    = errors.New("ambiguous or invalid message framing")
)

// HeadEnd returns the length of the head at the start of b including its
// blank line, or 0 if b does not hold a whole head yet.
func HeadEnd(b []byte) int { return headerEnd(b) }

// maxEmptyLines is how many empty lines a request may follow. RFC 9112
// section 2.2: a server SHOULD ignore at least one empty line (CRLF) before
// a request-line, which a client may send after a POST body. nginx ignores
// any number; a few are enough, and they count against the head's size
// limit and its time like any byte of it.
const maxEmptyLines = 4

// OnlyEmptyLines says b is nothing but the few empty lines a request may
// follow: a keep-alive connection that holds only those is idle.
func OnlyEmptyLines(b []byte) bool {
	n, err := emptyLines(b)
	return err == nil && n == len(b)
}

// emptyLines returns the length of the empty lines (CRLF or a bare LF) at
// the start of b, or ErrMalformed when there are more than maxEmptyLines.
func emptyLines(b []byte) (int, error) {
	n := 0
	for lines := 0; ; lines++ {
		var l int
		switch {
		case bytes.HasPrefix(b[n:], []byte("\r\n")):
			l = 2
		case bytes.HasPrefix(b[n:], []byte("\n")):
			l = 1
		default:
			return n, nil
		}
		if lines == maxEmptyLines {
			return 0, fmt.Errorf("%w: more than %d empty lines before the request line", ErrMalformed, maxEmptyLines)
		}
		n += l
	}
}

// ParseRequest parses the request head at the start of b, after at most
// maxEmptyLines empty lines, which count in its Len. It returns
// ErrIncomplete when b holds no whole head, ErrMalformed or ErrFraming (both
// answered 400) when the head is bad.
func ParseRequest(b []byte) (*Head, error) {
	skip, err := emptyLines(b)
	if err != nil {
		return nil, err
	}
	end := headerEnd(b[skip:])
	if end == 0 {
		return nil, ErrIncomplete
	}
	end += skip
	line, rest := firstLine(b[skip:end])
	f := bytes.Split(line, []byte{' '})
	if len(f) != 3 {
		return nil, fmt.Errorf("%w: request line %q", ErrMalformed, trunc(string(line)))
	}
	h := &Head{Method: string(f[0]), Target: string(f[1]), Proto: string(f[2]), Len: end, Start: skip}
	if !isToken(h.Method) {
		return nil, fmt.Errorf("%w: bad method %q", ErrMalformed, trunc(h.Method))
	}
	if h.Proto != "HTTP/1.1" && h.Proto != "HTTP/1.0" {
		return nil, fmt.Errorf("%w: protocol %q (want HTTP/1.0 or HTTP/1.1)", ErrMalformed, trunc(h.Proto))
	}
	switch {
	case h.Method == "CONNECT":
		h.Path = h.Target
	case h.Target == "*" && h.Method == "OPTIONS":
		h.Path = h.Target
	default:
		p, err := RoutePath(h.Target)
		if err != nil {
			return nil, err
		}
		h.Path = p
	}
	fl, err := scanFields(rest, skip+len(line)+lineEndLen(b[skip:], len(line)))
	if err != nil {
		return nil, err
	}
	if err := fl.frame(h, true, ""); err != nil {
		return nil, err
	}
	// A second Host could route one way here and another at the web
	// server: 400, as RFC 9112 section 3.2 requires.
	if len(fl.host) > 1 {
		return nil, fmt.Errorf("%w: %d Host headers", ErrMalformed, len(fl.host))
	}
	h.XFFEnd = fl.xffEnd
	var header string
	if len(fl.host) == 1 {
		header = fl.host[0]
	}
	if h.Method != "CONNECT" {
		if h.Host, err = RouteHost(h.Target, header); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// ParseResponse parses the response head at the start of b, the answer to
// a request with method. 1xx responses other than 101 are heads of their
// own: the final response follows them.
func ParseResponse(b []byte, method string) (*Head, error) {
	end := headerEnd(b)
	if end == 0 {
		return nil, ErrIncomplete
	}
	line, rest := firstLine(b[:end])
	proto, after, ok := bytes.Cut(line, []byte{' '})
	code, _, _ := bytes.Cut(after, []byte{' '})
	h := &Head{Proto: string(proto), Len: end}
	if !ok || (h.Proto != "HTTP/1.1" && h.Proto != "HTTP/1.0") || len(code) != 3 {
		return nil, fmt.Errorf("%w: status line %q", ErrMalformed, trunc(string(line)))
	}
	st, err := strconv.Atoi(string(code))
	if err != nil || st < 100 || st > 599 {
		return nil, fmt.Errorf("%w: status %q", ErrMalformed, code)
	}
	h.Status = st
	fl, err := scanFields(rest, len(line)+lineEndLen(b, len(line)))
	if err != nil {
		return nil, err
	}
	if err := fl.frame(h, false, method); err != nil {
		return nil, err
	}
	return h, nil
}

func firstLine(head []byte) (line, rest []byte) {
	i := bytes.IndexByte(head, '\n')
	line, rest = head[:i], head[i+1:]
	return bytes.TrimSuffix(line, []byte{'\r'}), rest
}

func lineEndLen(b []byte, n int) int {
	if n < len(b) && b[n] == '\r' {
		return 2
	}
	return 1
}

// fields are the header fields framing depends on.
type fields struct {
	contentLength    []string
	transferEncoding [][]byte
	connection       [][]byte
	connLines        int
	connLine         [2]int
	upgrade          bool
	expectContinue   bool
	host             []string
	xffEnd           int
}

// scanFields reads the header lines in rest (which starts at offset off in
// the head), rejecting malformed lines and obsolete line folding (RFC 9112
// section 5.2).
func scanFields(rest []byte, off int) (*fields, error) {
	fl := &fields{}
	pos := off
	for len(rest) > 0 {
		i := bytes.IndexByte(rest, '\n')
		raw := rest[:i+1]
		line := bytes.TrimSuffix(rest[:i], []byte{'\r'})
		rest = rest[i+1:]
		start := pos
		pos += len(raw)
		if len(line) == 0 {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			return nil, fmt.Errorf("%w: obsolete line folding", ErrMalformed)
		}
		name, value, ok := bytes.Cut(line, []byte{':'})
		if !ok || !isToken(string(name)) {
			return nil, fmt.Errorf("%w: header line %q", ErrMalformed, trunc(string(line)))
		}
		for _, c := range value {
			if c == 0 || c == '\r' || c == '\n' {
				return nil, fmt.Errorf("%w: control byte in header %q", ErrMalformed, trunc(string(name)))
			}
		}
		value = bytes.Trim(value, " \t")
		switch {
		case equalFold(name, "content-length"):
			fl.contentLength = append(fl.contentLength, string(value))
		case equalFold(name, "transfer-encoding"):
			fl.transferEncoding = append(fl.transferEncoding, tokens(value)...)
		case equalFold(name, "connection"):
			fl.connection = append(fl.connection, tokens(value)...)
			fl.connLines++
			fl.connLine = [2]int{start, pos}
		case equalFold(name, "upgrade"):
			fl.upgrade = true
		case equalFold(name, "host"):
			fl.host = append(fl.host, string(value))
		case equalFold(name, "x-forwarded-for"):
			// Where the last one's value ends, before its trailing
			// blanks and line end: a relay appends the client there.
			fl.xffEnd = start + len(bytes.TrimRight(line, " \t"))
		case equalFold(name, "expect"):
			fl.expectContinue = equalFold(value, "100-continue")
		}
	}
	return fl, nil
}

func tokens(v []byte) [][]byte {
	var out [][]byte
	for _, t := range bytes.Split(v, []byte{','}) {
		if t = bytes.Trim(t, " \t"); len(t) > 0 {
			out = append(out, t)
		}
	}
	return out
}

func equalFold(b []byte, s string) bool { return len(b) == len(s) && bytes.EqualFold(b, []byte(s)) }

func (fl *fields) has(tok string) bool {
	for _, t := range fl.connection {
		if equalFold(t, tok) {
			return true
		}
	}
	return false
}

// frame decides how the message's body ends and whether the connection
// persists (RFC 9112 sections 6.1, 6.3 and 9.3). Whatever a front end and a
// back end could read differently — Transfer-Encoding with Content-Length,
// differing lengths, a coding other than chunked last in a request — is
// refused (request smuggling).
func (fl *fields) frame(h *Head, request bool, method string) error {
	h.KeepAlive = h.Proto == "HTTP/1.1" && !fl.has("close") || h.Proto == "HTTP/1.0" && fl.has("keep-alive") && !fl.has("close")
	h.ConnClose = fl.connLines == 1 && len(fl.connection) == 1 && equalFold(fl.connection[0], "close")
	if fl.connLines == 1 {
		h.ConnLine = fl.connLine
	}
	h.Continue = request && fl.expectContinue
	h.Upgrade = request && fl.upgrade && fl.has("upgrade")

	if !request {
		switch {
		case h.Status == 101:
			h.Body = BodyTunnel
			return nil
		case h.Status < 200 || h.Status == 204 || h.Status == 304 || method == "HEAD":
			h.Body = BodyNone
			return nil
		case method == "CONNECT" && h.Status < 300:
			h.Body = BodyTunnel
			return nil
		}
	}
	length := int64(-1)
	for _, v := range fl.contentLength {
		for _, part := range bytes.Split([]byte(v), []byte{','}) {
			n, err := strconv.ParseInt(string(bytes.Trim(part, " \t")), 10, 64)
			if err != nil || n < 0 || !isDigits(bytes.Trim(part, " \t")) {
				return fmt.Errorf("%w: Content-Length %q", ErrFraming, trunc(v))
			}
			if length >= 0 && n != length {
				return fmt.Errorf("%w: Content-Length values differ", ErrFraming)
			}
			length = n
		}
	}
	if len(fl.transferEncoding) > 0 {
		if length >= 0 {
			return fmt.Errorf("%w: both Transfer-Encoding and Content-Length", ErrFraming)
		}
		last := fl.transferEncoding[len(fl.transferEncoding)-1]
		chunked := equalFold(last, "chunked")
		for _, t := range fl.transferEncoding[:len(fl.transferEncoding)-1] {
			if equalFold(t, "chunked") {
				return fmt.Errorf("%w: chunked applied twice", ErrFraming)
			}
		}
		switch {
		case chunked:
			h.Body = BodyChunked
		case request:
			return fmt.Errorf("%w: request Transfer-Encoding without chunked last", ErrFraming)
		default:
			h.Body, h.KeepAlive = BodyClose, false
		}
		if request && h.Proto == "HTTP/1.0" {
			return fmt.Errorf("%w: Transfer-Encoding in an HTTP/1.0 request", ErrFraming)
		}
		return nil
	}
	switch {
	case length > 0:
		h.Body, h.Length = BodyLength, length
	case length == 0 || request:
		h.Body = BodyNone
	default:
		h.Body, h.KeepAlive = BodyClose, false
	}
	return nil
}

func isDigits(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// Chunks finds the end of a chunked body as its bytes go by (RFC 9112
// section 7.1): chunk sizes, chunk data, the last chunk, trailer fields and
// the final line end. Its zero value is ready for a body's first byte.
type Chunks struct {
	state   chunkState
	remain  int64 // data bytes left in this chunk
	line    int   // bytes of the current size or trailer line
	digits  int
	trailer bool // the current trailer line is not empty
}

type chunkState uint8

const (
	csSize      chunkState = iota // chunk size, hex digits
	csExt                         // chunk extension, to the line end
	csSizeLF                      // LF after the size line's CR
	csData                        // chunk data
	csDataCR                      // CR after the data
	csDataLF                      // LF after the data
	csTrailer                     // a trailer line, or the final empty line
	csTrailerLF                   // LF ending a trailer line
	csDone
)

// maxChunkLine bounds a chunk-size line with its extensions, and a trailer
// line.
const maxChunkLine = 4096

// Scan consumes body bytes from b and returns how many belong to the body:
// all of b while the body goes on, fewer once its end is in b (done). The
// bytes after the body are the next message's.
func (c *Chunks) Scan(b []byte) (n int, done bool, err error) {
	for n < len(b) {
		ch := b[n]
		switch c.state {
		case csData:
			take := min(c.remain, int64(len(b)-n))
			n += int(take)
			c.remain -= take
			if c.remain == 0 {
				c.state = csDataCR
			}
			continue
		case csSize:
			switch {
			case hexVal(ch) >= 0:
				if c.digits++; c.digits > 15 {
					return n, false, fmt.Errorf("%w: chunk size too large", ErrFraming)
				}
				c.remain = c.remain<<4 | int64(hexVal(ch))
			case ch == ';' || ch == ' ' || ch == '\t':
				if c.digits == 0 {
					return n, false, fmt.Errorf("%w: chunk size missing", ErrFraming)
				}
				c.state = csExt
			case ch == '\r':
				if c.digits == 0 {
					return n, false, fmt.Errorf("%w: chunk size missing", ErrFraming)
				}
				c.state = csSizeLF
			default:
				return n, false, fmt.Errorf("%w: byte 0x%02x in chunk size", ErrFraming, ch)
			}
		case csExt:
			if ch == '\r' {
				c.state = csSizeLF
			} else if ch == '\n' || ch == 0 {
				return n, false, fmt.Errorf("%w: bad chunk extension", ErrFraming)
			}
		case csSizeLF:
			if ch != '\n' {
				return n, false, fmt.Errorf("%w: chunk size line not ended by CRLF", ErrFraming)
			}
			c.line, c.digits = -1, 0
			if c.remain == 0 {
				c.state = csTrailer
			} else {
				c.state = csData
			}
		case csDataCR:
			if ch != '\r' {
				return n, false, fmt.Errorf("%w: chunk data not followed by CRLF", ErrFraming)
			}
			c.state = csDataLF
		case csDataLF:
			if ch != '\n' {
				return n, false, fmt.Errorf("%w: chunk data not followed by CRLF", ErrFraming)
			}
			c.state, c.line = csSize, -1
		case csTrailer:
			if ch == '\r' {
				c.state = csTrailerLF
			} else if ch == '\n' || ch == 0 {
				return n, false, fmt.Errorf("%w: bad trailer line", ErrFraming)
			} else {
				c.trailer = true
			}
		case csTrailerLF:
			if ch != '\n' {
				return n, false, fmt.Errorf("%w: trailer line not ended by CRLF", ErrFraming)
			}
			n++
			if !c.trailer {
				c.state = csDone
				return n, true, nil
			}
			c.state, c.trailer, c.line = csTrailer, false, 0
			continue
		case csDone:
			return n, true, nil
		}
		n++
		if c.line++; c.line > maxChunkLine {
			return n, false, fmt.Errorf("%w: chunk line over %d bytes", ErrFraming, maxChunkLine)
		}
	}
	return n, c.state == csDone, nil
}

func hexVal(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// ChunksState is a Chunks scanner's position, to carry a chunked body's
// relay over to another process (a BE's upgrade).
type ChunksState struct {
	State   uint8 `json:"state"`
	Remain  int64 `json:"remain"`
	Line    int   `json:"line"`
	Digits  int   `json:"digits"`
	Trailer bool  `json:"trailer"`
}

// Save returns the scanner's position.
func (c *Chunks) Save() ChunksState {
	return ChunksState{State: uint8(c.state), Remain: c.remain, Line: c.line, Digits: c.digits, Trailer: c.trailer}
}

// Restore puts the scanner at a saved position; a state it does not know
// is an error.
func (c *Chunks) Restore(s ChunksState) error {
	if chunkState(s.State) > csDone || s.Remain < 0 || s.Digits < 0 || s.Digits > 15 {
		return fmt.Errorf("%w: chunk scanner state %+v", ErrFraming, s)
	}
	*c = Chunks{state: chunkState(s.State), remain: s.Remain, line: s.Line, digits: s.Digits, trailer: s.Trailer}
	return nil
}
