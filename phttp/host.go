package phttp

import (
	"fmt"
	"strings"
)

// RouteHost returns the host a request's rules match: the authority of an
// absolute-form target, which takes precedence (RFC 9112 section 3.2.2),
// or else the Host header's value; lowercase, without the port and without
// a trailing dot ("WWW.Example.com.:8080" → "www.example.com"). An empty
// result is a request without a host (HTTP/1.0), which no `host=` rule
// matches. A host with bytes no DNS name or address literal has (RFC 3986
// section 3.2.2's reg-name, IP-literal) is malformed.
func RouteHost(target, header string) (string, error) {
	h := header
	if _, rest, ok := strings.Cut(target, "://"); ok && !strings.HasPrefix(target, "/") {
		h = rest
		if i := strings.IndexAny(h, "/?#"); i >= 0 {
			h = h[:i]
		}
		if i := strings.LastIndexByte(h, '@'); i >= 0 {
			h = h[i+1:] // userinfo is never part of the host
		}
	}
	if h == "" {
		return "", nil
	}
	host := h
	if strings.HasPrefix(host, "[") {
		end := strings.IndexByte(host, ']')
		if end < 0 {
			return "", fmt.Errorf("%w: host %q", ErrMalformed, trunc(h))
		}
		if port := host[end+1:]; port != "" && !validPort(port) {
			return "", fmt.Errorf("%w: host %q", ErrMalformed, trunc(h))
		}
		host = host[:end+1]
	} else if i := strings.LastIndexByte(host, ':'); i >= 0 {
		if !validPort(host[i:]) {
			return "", fmt.Errorf("%w: host %q", ErrMalformed, trunc(h))
		}
		host = host[:i]
	}
	host = strings.TrimSuffix(host, ".")
	var b strings.Builder
	for i := 0; i < len(host); i++ {
		c := host[i]
		switch {
		case 'A' <= c && c <= 'Z':
			c += 'a' - 'A'
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '.', c == '_':
		case (c == '[' || c == ']' || c == ':') && strings.HasPrefix(host, "["):
		default:
			return "", fmt.Errorf("%w: host %q", ErrMalformed, trunc(h))
		}
		b.WriteByte(c)
	}
	return b.String(), nil
}

// validPort says p is ":" and up to five digits, or ":" alone (RFC 3986
// section 3.2.3 allows an empty port).
func validPort(p string) bool {
	if p == "" || p[0] != ':' || len(p) > 6 {
		return false
	}
	for _, c := range p[1:] {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}
