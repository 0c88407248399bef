package phttp

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// What nginx 1.22 (merge_slashes on) has as $uri for each target, from
// ngx_http_parse_request_line and ngx_http_parse_complex_uri.
func TestRoutePath(t *testing.T) {
	cases := []struct{ target, want string }{
		{"/", "/"},
		{"/index.html", "/index.html"},
		{"/img/a.jpg?v=2", "/img/a.jpg"},
		{"/index.html#.jpg", "/index.html"},
		{"/index.html?x#.jpg", "/index.html"},
		{"/x/../img/a.jpg", "/img/a.jpg"},
		{"/img/../secret", "/secret"},
		{"/img/./a.jpg", "/img/a.jpg"},
		{"/img/.", "/img/"},
		{"/img/..", "/"},
		{"/a/b/../../c", "/c"},
		{"/a/./../b", "/b"},
		{"//img///a.jpg", "/img/a.jpg"},
		{"/a/..?x", "/"},
		{"/a/.#x", "/a/"},
		{"/a/..b/...", "/a/..b/..."}, // not dot segments
		{"/.hidden/.x", "/.hidden/.x"},
		{"/a%20b.jpg", "/a b.jpg"},
		{"/Img/A.JPG", "/Img/A.JPG"}, // case kept
		{"/img%2F..%2Fsecret", "/secret"},
		{"/img/%2e%2e/secret", "/secret"},
		{"/img/%2E./secret", "/secret"},
		{"/img/.%2e/secret", "/secret"},
		{"/img/%2e/a", "/img/a"},
		{"/a%2F%2Fb", "/a/b"},
		{"/a%23.jpg", "/a#.jpg"},     // a decoded # is a character
		{"/a%3F.jpg", "/a?.jpg"},     // and so is a decoded ?
		{"/a%252e%252e", "/a%2e%2e"}, // decoded once only
		{"/.%23", "/.#"},
		{"/..%3f", "/..?"},
		{"/%C3%A9t%c3%a9", "/\xc3\xa9t\xc3\xa9"},
		{"/a+b", "/a+b"},
		{"http://h/a/b.png", "/a/b.png"},
		{"http://h:8080/x/../y", "/y"},
		{"HTTPS://h", "/"},
		{"http://h?q=1", "/"},
		{"http://h#f", "/"},
		{"http://h//a", "/a"},
	}
	for _, tc := range cases {
		got, err := RoutePath(tc.target)
		if err != nil || got != tc.want {
			t.Errorf("RoutePath(%q) = %q, %v; want %q", tc.target, got, err, tc.want)
		}
	}
}

func TestRoutePathRefuses(t *testing.T) {
	for _, target := range []string{
		"/..", "/../x", "/a/../..", "//..//x", "/%2e%2e/x", "/a/%2E%2E/%2e%2e",
		"/a%", "/a%2", "/a%zz", "/a%2g", "/a%00b",
		"/a\x01b", "/a\x7f",
		"a/b", "*", "", "http:/x", "mailto:a@b", "1http://h/", "ht tp://h/",
	} {
		if got, err := RoutePath(target); !errors.Is(err, ErrMalformed) {
			t.Errorf("RoutePath(%q) = %q, %v; want ErrMalformed", target, got, err)
		}
	}
}

// escapeRoute writes a routed path back as a target nginx would route the
// same: the bytes a target may not hold as they are (control bytes) or
// that mean something in it ("%", "?", "#") are escaped again.
func escapeRoute(p string) string {
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		if c := p[i]; c < 0x20 || c == 0x7f || c == '%' || c == '?' || c == '#' {
			fmt.Fprintf(&b, "%%%02X", c)
		} else {
			b.WriteByte(c)
		}
	}
	return b.String()
}

func FuzzRoutePath(f *testing.F) {
	for _, s := range []string{"/index.html#.jpg", "/x/../img/a.jpg", "/img/../secret", "/a%2F%2e%2e/b?c",
		"http://h/a//b/./c/..", "/%25%23%3F", "/.%2e", "//"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, target string) {
		p, err := RoutePath(target)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v is not ErrMalformed", err)
			}
			return
		}
		if !strings.HasPrefix(p, "/") {
			t.Fatalf("%q routes as %q, not a path", target, p)
		}
		for _, bad := range []string{"//", "/./", "/../"} {
			if strings.Contains(p, bad) {
				t.Fatalf("%q routes as %q, which holds %q", target, p, bad)
			}
		}
		if strings.HasSuffix(p, "/.") || strings.HasSuffix(p, "/..") {
			t.Fatalf("%q routes as %q, which ends in a dot segment", target, p)
		}
		// A "#", "?" or "%" in the path is one the target escaped: the
		// fragment and the query are never in it.
		lower := strings.ToLower(target)
		for c, esc := range map[string]string{"#": "%23", "?": "%3f", "%": "%25"} {
			if strings.Count(p, c) > strings.Count(lower, esc) {
				t.Fatalf("%q routes as %q: more %q than %s in the target", target, p, c, esc)
			}
		}
		// Routing what it routes as, escaped again, is the same path.
		if again, err := RoutePath(escapeRoute(p)); err != nil || again != p {
			t.Fatalf("%q routes as %q, which routes as %q, %v", target, p, again, err)
		}
	})
}
