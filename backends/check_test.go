package backends

import (
	"strings"
	"testing"
)

func TestParseCheck(t *testing.T) {
	for _, tc := range []struct{ in, want, err string }{
		{in: "GET /health", want: "GET /health host=localhost expect=200-399"},
		{in: "HEAD /  host=www.example", want: "HEAD / host=www.example expect=200-399"},
		{in: "GET", err: "want METHOD PATH"},
		{in: "GET health", err: "must start with /"},
		{in: "G(T /", err: "not an HTTP method"},
		{in: "GET / www.example", err: "want host=NAME"},
		{in: "GET / host=", err: "want host=NAME"},
		{in: "GET / host=a b", err: "want METHOD PATH"},
	} {
		c, err := ParseCheck(tc.in)
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: err %v, want %q", tc.in, err, tc.err)
			}
		case err != nil:
			t.Errorf("%q: %v", tc.in, err)
		case c.String() != tc.want:
			t.Errorf("%q: %q, want %q", tc.in, c.String(), tc.want)
		}
	}
}

func TestExpect(t *testing.T) {
	e, err := ParseExpect("200-299, 301,302 ,404")
	if err != nil {
		t.Fatal(err)
	}
	if e.String() != "200-299,301,302,404" {
		t.Errorf("String: %q", e.String())
	}
	for code, want := range map[int]bool{199: false, 200: true, 299: true, 300: false, 301: true, 302: true, 303: false, 404: true, 500: false} {
		if e.Match(code) != want {
			t.Errorf("Match(%d) = %v", code, !want)
		}
	}
	for _, bad := range []string{"", "2xx", "99", "600", "399-200", "200-", "200,,300"} {
		if _, err := ParseExpect(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestJudge(t *testing.T) {
	c := DefaultCheck
	for line, up := range map[string]bool{
		"HTTP/1.1 200 OK\r\n":                    true,
		"HTTP/1.0 302 Found\r\n":                 true,
		"HTTP/1.1 204\r\n":                       true,
		"HTTP/1.1 500 Internal Server Error\r\n": false,
		"HTTP/1.1 404 Not Found\r\n":             false,
		"HTTP/1.1 2000 OK\r\n":                   false,
		"HTTP/2 200\r\n":                         false,
		"SSH-2.0-OpenSSH\r\n":                    false,
		"":                                       false,
	} {
		if err := c.Judge(line); (err == nil) != up {
			t.Errorf("%q: %v, want up=%v", line, err, up)
		}
	}
}

func TestCheckText(t *testing.T) {
	c, _ := ParseCheck("GET /a?b=c host=x.example")
	c.Expect = Expect{{Lo: 200, Hi: 200}, {Lo: 301, Hi: 302}}
	b, _ := c.MarshalText()
	var back Check
	if err := back.UnmarshalText(b); err != nil {
		t.Fatal(err)
	}
	if back.String() != c.String() {
		t.Errorf("%q came back as %q", c, back)
	}
	for _, bad := range []string{"", "GET / host=x", "GET / host=x expect=2xx", "GET expect=200"} {
		if err := back.UnmarshalText([]byte(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestOverride(t *testing.T) {
	asked, _ := ParseCheck("GET /fe host=fe.example")
	own, _ := ParseCheck("HEAD /be")
	if got := asked.Override(Check{}); got.String() != asked.String() {
		t.Errorf("no own lines: %v", got)
	}
	if got := asked.Override(Check{Method: own.Method, Path: own.Path, Host: own.Host}); got.String() != "HEAD /be host=localhost expect=200-399" {
		t.Errorf("own check: %v", got)
	}
	if got := asked.Override(Check{Expect: Expect{{Lo: 200, Hi: 200}}}); got.String() != "GET /fe host=fe.example expect=200" {
		t.Errorf("own checkexpect: %v", got)
	}
}

func TestAsked(t *testing.T) {
	own := Check{Expect: Expect{{Lo: 200, Hi: 200}}}
	if _, ok := Asked(nil, own); ok {
		t.Error("a keepalive probe asked for a check")
	}
	if _, ok := Asked([]byte("garbage"), own); ok {
		t.Error("a payload that does not read asked for a check")
	}
	fe, _ := ParseCheck("GET /health")
	b, _ := fe.MarshalText()
	c, ok := Asked(b, own)
	if !ok || c.String() != "GET /health host=localhost expect=200" {
		t.Errorf("Asked: %v %v", c, ok)
	}
}
