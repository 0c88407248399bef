package phttp

import (
	"errors"
	"testing"
)

func TestRouteHost(t *testing.T) {
	for _, c := range []struct{ target, header, want string }{
		{"/", "www.example.com", "www.example.com"},
		{"/", "WWW.Example.COM:8080", "www.example.com"},
		{"/", "www.example.com.", "www.example.com"},
		{"/", "www.example.com.:80", "www.example.com"},
		{"/", "10.0.0.1:80", "10.0.0.1"},
		{"/", "[::1]:80", "[::1]"},
		{"/", "[::1]", "[::1]"},
		{"/", "host:", "host"},
		{"/", "", ""},
		// The absolute form's authority wins over the header (RFC 9112
		// section 3.2.2), and its userinfo is not the host.
		{"http://img.example/a.jpg", "www.example", "img.example"},
		{"http://user@IMG.example:81/a", "", "img.example"},
		{"http://img.example?x", "www.example", "img.example"},
		{"/a://b", "www.example", "www.example"},
	} {
		got, err := RouteHost(c.target, c.header)
		if err != nil || got != c.want {
			t.Errorf("RouteHost(%q, %q) = %q, %v; want %q", c.target, c.header, got, err, c.want)
		}
	}
	for _, c := range []struct{ target, header string }{
		{"/", "a b"}, {"/", "a/b"}, {"/", "a:b"}, {"/", "a:123456"}, {"/", "[::1"}, {"/", "[::1]x"},
		{"/", "a\x00"}, {"/", "ex%41mple"}, {"http://a b/", ""},
	} {
		if got, err := RouteHost(c.target, c.header); !errors.Is(err, ErrMalformed) {
			t.Errorf("RouteHost(%q, %q) = %q, %v; want ErrMalformed", c.target, c.header, got, err)
		}
	}
}

func TestParseRequestHost(t *testing.T) {
	h, err := ParseRequest([]byte("GET /a HTTP/1.1\r\nhOST: Img.Example:80\r\n\r\n"))
	if err != nil || h.Host != "img.example" {
		t.Fatalf("host %q, %v", h.Host, err)
	}
	if _, err := ParseRequest([]byte("GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")); !errors.Is(err, ErrMalformed) {
		t.Errorf("two Host headers: %v, want ErrMalformed", err)
	}
	if h, err := ParseRequest([]byte("GET /a HTTP/1.0\r\n\r\n")); err != nil || h.Host != "" {
		t.Errorf("no Host: %q, %v", h.Host, err)
	}
}
