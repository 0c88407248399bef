// Package accesslog is the access log's line format ([global] accesslog):
// one line per request a BE serves and per connection an FE hands off,
// with HAProxy's httplog fields as the model. The format is pure here;
// writer.go is the file behind it.
//
// A line is 12 fields separated by single spaces:
//
//	TIME ROLE CLIENT VHOST METHOD "TARGET" STATUS BYTES SERVED BE LATENCY TOTAL
//
// TIME is when the request (on the FE: the connection) started, RFC 3339
// in UTC with milliseconds. No field ever holds a raw space, quote,
// backslash, control byte or non-ASCII byte: those are written \xHH, so a
// hostile request cannot forge a line or a field, and the line splits back
// on spaces into exactly 12 fields (Split).
package accesslog

import (
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Role is the agent role that wrote a line.
type Role string

const (
	FE Role = "fe"
	BE Role = "be"
)

// Served is where a request went.
type Served string

const (
	// Here: this BE's web server answered.
	Here Served = "here"
	// Forward: another BE's web server, fetched by this BE (phttp =
	// forward, or a move that failed); BE names it.
	Forward Served = "forward"
	// Move: the connection moved to another BE for this request (phttp =
	// multi); that BE logs the request. LATENCY is the move's.
	Move Served = "move"
	// Handoff: the FE handed the connection to BE; LATENCY is the
	// handoff's.
	Handoff Served = "handoff"
	// Local: the FE's own web server (a `local` rule, or no BE could take
	// the connection).
	Local Served = "local"
	// Answered: the agent answered with an error of its own (STATUS):
	// a bad or slow head, or no BE for the request.
	Answered Served = "answered"
)

// Fields is how many fields every line has.
const Fields = 12

// Entry is one line of the access log.
type Entry struct {
	// Time is when the request (FE: the connection) started.
	Time   time.Time
	Role   Role
	Client netip.AddrPort
	// Host is the request's host as phttp.Head.Host gives it; Method and
	// Target as the client sent them. Empty ones are written "-".
	Host, Method, Target string
	// Status is the response's final status; 0 (written "-") when the
	// agent never saw one (a handoff, a move, a tunnel's peer).
	Status int
	// Bytes is what went to the client: response heads and bodies.
	Bytes  int64
	Served Served
	// BE is the BE that served (or took) the request: an address, or
	// empty ("-").
	BE string
	// Latency is the handoff's or the move's (0: none, "-"); Total the
	// time from Time to the end of the response (FE: of the handoff).
	Latency, Total time.Duration
}

// timeFormat is RFC 3339 with milliseconds; in UTC it ends in Z.
const timeFormat = "2006-01-02T15:04:05.000Z07:00"

// AppendLine appends e's line, ending in a newline, to b.
func AppendLine(b []byte, e Entry) []byte {
	b = e.Time.UTC().AppendFormat(b, timeFormat)
	b = append(b, ' ')
	b = appendWord(b, string(e.Role))
	b = append(b, ' ')
	if e.Client.IsValid() {
		b = e.Client.AppendTo(b)
	} else {
		b = append(b, '-')
	}
	b = append(b, ' ')
	b = appendWord(b, e.Host)
	b = append(b, ' ')
	b = appendWord(b, e.Method)
	b = append(b, ' ', '"')
	b = appendEscaped(b, e.Target)
	b = append(b, '"', ' ')
	if e.Status > 0 {
		b = strconv.AppendInt(b, int64(e.Status), 10)
	} else {
		b = append(b, '-')
	}
	b = append(b, ' ')
	b = strconv.AppendInt(b, max(e.Bytes, 0), 10)
	b = append(b, ' ')
	b = appendWord(b, string(e.Served))
	b = append(b, ' ')
	b = appendWord(b, e.BE)
	b = append(b, ' ')
	b = appendMillis(b, e.Latency)
	b = append(b, ' ')
	b = appendMillis(b, e.Total)
	return append(b, '\n')
}

// appendWord appends s escaped, or "-" for an empty s; a value that is
// itself "-" is escaped so that it still reads as that value.
func appendWord(b []byte, s string) []byte {
	switch s {
	case "":
		return append(b, '-')
	case "-":
		return append(b, `\x2d`...)
	}
	return appendEscaped(b, s)
}

const hex = "0123456789abcdef"

// appendEscaped appends s with every byte outside printable ASCII, and
// space, '"' and '\', written \xHH.
func appendEscaped(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			b = append(b, '\\', 'x', hex[c>>4], hex[c&0xf])
			continue
		}
		b = append(b, c)
	}
	return b
}

// appendMillis appends d in milliseconds with three decimals (handoffs
// take well under one), or "-" for none.
func appendMillis(b []byte, d time.Duration) []byte {
	if d <= 0 {
		return append(b, '-')
	}
	us := d.Microseconds()
	b = strconv.AppendInt(b, us/1000, 10)
	frac := us % 1000
	return append(b, '.', byte('0'+frac/100), byte('0'+frac/10%10), byte('0'+frac%10))
}

// Split splits a line (with or without its newline) into its fields.
func Split(line string) []string {
	return strings.Split(strings.TrimSuffix(line, "\n"), " ")
}

// Unescape turns a field back into the value it was written from: \xHH
// into its byte, "-" into the empty string, and a quoted target into its
// contents.
func Unescape(field string) string {
	if field == "-" {
		return ""
	}
	if len(field) >= 2 && field[0] == '"' && field[len(field)-1] == '"' {
		field = field[1 : len(field)-1]
	}
	out := make([]byte, 0, len(field))
	for i := 0; i < len(field); i++ {
		if field[i] == '\\' && i+3 < len(field) && field[i+1] == 'x' {
			hi, lo := unhex(field[i+2]), unhex(field[i+3])
			if hi >= 0 && lo >= 0 {
				out = append(out, byte(hi<<4|lo))
				i += 3
				continue
			}
		}
		out = append(out, field[i])
	}
	return string(out)
}

func unhex(c byte) int {
	switch {
	case '0' <= c && c <= '9':
		return int(c - '0')
	case 'a' <= c && c <= 'f':
		return int(c - 'a' + 10)
	}
	return -1
}
