package backends

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Check is the request a BE's agent sends its web server to tell whether
// it can serve ([fe] check, [be] check), and the statuses that count as
// up ([fe] checkexpect), as keepalived's HTTP_GET and HAProxy's
// `http-check expect status` do. Any HTTP answer counting as up (seed
// 4.9) kept a BE that answered 500 to everything in the rotation.
type Check struct {
	Method, Path, Host string
	Expect             Expect
}

// DefaultCheck is the probe when the config names none: what the seed
// asked (HEAD / for localhost), judged as HAProxy does, 2xx and 3xx up.
var DefaultCheck = Check{Method: "HEAD", Path: "/", Host: "localhost", Expect: DefaultExpect}

// DefaultExpect is checkexpect's default: 200-399.
var DefaultExpect = Expect{{Lo: 200, Hi: 399}}

// CheckAgent is the probe's User-Agent, for keeping it out of the web
// server's access log (tcpha.conf(5), CHECKS).
const CheckAgent = "tcpha-check"

// ParseCheck reads `METHOD PATH [host=H]`, the key's value without its
// expect part.
func ParseCheck(s string) (Check, error) {
	f := strings.Fields(s)
	if len(f) < 2 || len(f) > 3 {
		return Check{}, fmt.Errorf("%q: want METHOD PATH [host=H], e.g. GET /health host=localhost", s)
	}
	c := Check{Method: f[0], Path: f[1], Host: "localhost", Expect: DefaultExpect}
	if !isToken(c.Method) {
		return Check{}, fmt.Errorf("%q is not an HTTP method", c.Method)
	}
	if !strings.HasPrefix(c.Path, "/") || strings.ContainsAny(c.Path, "\r\n\x00") {
		return Check{}, fmt.Errorf("%q: the path must start with /", c.Path)
	}
	if len(f) == 3 {
		h, ok := strings.CutPrefix(f[2], "host=")
		if !ok || h == "" || strings.ContainsAny(h, "\r\n\x00/") {
			return Check{}, fmt.Errorf("%q: want host=NAME", f[2])
		}
		c.Host = h
	}
	return c, nil
}

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if r <= ' ' || r >= 0x7f || strings.ContainsRune(`"(),/:;<=>?@[\]{}`, r) {
			return false
		}
	}
	return true
}

// String is the check as the config and the probe frame write it:
// `METHOD PATH host=H expect=E`.
func (c Check) String() string {
	return fmt.Sprintf("%s %s host=%s expect=%s", c.Method, c.Path, c.Host, c.Expect)
}

// MarshalText is the probe frame's payload: the FE tells the BE which
// check it wants judged.
func (c Check) MarshalText() ([]byte, error) { return []byte(c.String()), nil }

// UnmarshalText reads what MarshalText wrote.
func (c *Check) UnmarshalText(b []byte) error {
	s := string(b)
	i := strings.LastIndex(s, " expect=")
	if i < 0 {
		return fmt.Errorf("check %q: no expect=", s)
	}
	e, err := ParseExpect(s[i+len(" expect="):])
	if err != nil {
		return fmt.Errorf("check %q: %w", s, err)
	}
	nc, err := ParseCheck(s[:i])
	if err != nil {
		return fmt.Errorf("check %q: %w", s, err)
	}
	nc.Expect = e
	*c = nc
	return nil
}

// Request is the HTTP/1.0 request the check sends: 1.0 so that the server
// closes after its answer, with a User-Agent a server can keep out of its
// log.
func (c Check) Request() string {
	return fmt.Sprintf("%s %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: %s\r\n\r\n", c.Method, c.Path, c.Host, CheckAgent)
}

// Judge reads the web server's status line: nil when it is HTTP/1.x with a
// status Expect accepts.
func (c Check) Judge(statusLine string) error {
	line := strings.TrimRight(statusLine, "\r\n")
	rest, ok := strings.CutPrefix(line, "HTTP/1.")
	if !ok || len(rest) < 5 || rest[1] != ' ' {
		return fmt.Errorf("answered %q, not HTTP", line)
	}
	code, err := strconv.Atoi(rest[2:5])
	if err != nil || (len(rest) > 5 && rest[5] != ' ') {
		return fmt.Errorf("answered %q, not an HTTP status", line)
	}
	if !c.Expect.Match(code) {
		return fmt.Errorf("%s %s answered %d, want %s", c.Method, c.Path, code, c.Expect)
	}
	return nil
}

// Expect is checkexpect: the statuses that count as up, as ranges.
type Expect []StatusRange

// StatusRange is Lo to Hi, inclusive.
type StatusRange struct{ Lo, Hi int }

// ErrExpect is a checkexpect that is not a list of statuses.
var ErrExpect = errors.New("want statuses or ranges from 100 to 599, e.g. 200-399 or 200,204,301-302")

// ParseExpect reads `200-399`, `200`, or a comma-separated list of both.
func ParseExpect(s string) (Expect, error) {
	var e Expect
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		lo, hi, isRange := strings.Cut(part, "-")
		if !isRange {
			hi = lo
		}
		l, err1 := strconv.Atoi(strings.TrimSpace(lo))
		h, err2 := strconv.Atoi(strings.TrimSpace(hi))
		if err1 != nil || err2 != nil || l < 100 || h > 599 || l > h {
			return nil, fmt.Errorf("%q: %w", s, ErrExpect)
		}
		e = append(e, StatusRange{Lo: l, Hi: h})
	}
	return e, nil
}

// Match says whether code counts as up.
func (e Expect) Match(code int) bool {
	for _, r := range e {
		if code >= r.Lo && code <= r.Hi {
			return true
		}
	}
	return false
}

func (e Expect) String() string {
	s := make([]string, len(e))
	for i, r := range e {
		if r.Lo == r.Hi {
			s[i] = strconv.Itoa(r.Lo)
		} else {
			s[i] = fmt.Sprintf("%d-%d", r.Lo, r.Hi)
		}
	}
	return strings.Join(s, ",")
}

// Override is the check a BE runs when an FE asks for c and the BE's own
// lines say own: [be] check replaces the request (Method empty: not
// given), [be] checkexpect the statuses (nil: not given). A BE knows its
// web server best; the FE's lines are the cluster's default.
func (c Check) Override(own Check) Check {
	if own.Method != "" {
		c.Method, c.Path, c.Host = own.Method, own.Path, own.Host
	}
	if own.Expect != nil {
		c.Expect = own.Expect
	}
	return c
}

// Asked is the check a BE runs for a probe's payload: the check the FE
// asks for, under the BE's own lines. ok is false when the probe names
// none (a keepalive, an FE of an older version) or one that does not
// read; the BE then keeps the check it runs.
func Asked(probe []byte, own Check) (c Check, ok bool) {
	if len(probe) == 0 || c.UnmarshalText(probe) != nil {
		return Check{}, false
	}
	return c.Override(own), true
}
