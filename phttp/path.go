package phttp

import (
	"bytes"
	"fmt"
	"strings"
)

// RoutePath returns the path the rules match for a request-target: the
// path nginx matches its locations on ($uri), so that a client cannot pick
// a BE with a path the web server reads differently (issue 19: `/a#.jpg`,
// `/x/../img/a.jpg` and `/img/../secret` went by what they looked like,
// nginx served what they meant).
//
// It follows nginx 1.22's ngx_http_parse_complex_uri with merge_slashes on
// (its default):
//   - an absolute-form target ("http://host/p") routes on its path, "/" when
//     it has none;
//   - the query ("?...") and a fragment ("#...") are not part of it;
//   - every %XX is decoded; a decoded "/" or "." counts as one (so %2e%2e is
//     a dot segment), a decoded "%", "?" or "#" is a plain character, a
//     decoded NUL or a bad escape is an error;
//   - runs of "/" become one, "." segments go, ".." segments take the
//     segment before them with them (RFC 3986 section 5.2.4); one that
//     climbs above the root is an error, as nginx answers it 400;
//   - case is kept.
//
// The error wraps ErrMalformed. A target with a control byte is one too.
func RoutePath(target string) (string, error) {
	for i := 0; i < len(target); i++ {
		if c := target[i]; c < 0x20 || c == 0x7f {
			return "", fmt.Errorf("%w: control byte 0x%02x in target", ErrMalformed, c)
		}
	}
	p, ok := originPath(target)
	if !ok {
		return "", fmt.Errorf("%w: target %q is neither a path nor an absolute URI", ErrMalformed, trunc(target))
	}
	if n, ok := plainPath(p); ok {
		return p[:n], nil
	}
	return normalize(p, target)
}

// originPath returns the part of target from its path on: the target
// itself in origin form, what follows the authority in absolute form
// (scheme "://" authority), with "/" put in front of an empty path as nginx
// does.
func originPath(target string) (string, bool) {
	if strings.HasPrefix(target, "/") {
		return target, true
	}
	scheme, rest, ok := strings.Cut(target, "://")
	if !ok || !isScheme(scheme) {
		return "", false
	}
	i := strings.IndexAny(rest, "/?#")
	switch {
	case i < 0:
		return "/", true
	case rest[i] == '/':
		return rest[i:], true
	}
	return "/" + rest[i:], true
}

// isScheme says s is a URI scheme (RFC 3986 section 3.1).
func isScheme(s string) bool {
	if s == "" || !isAlpha(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !isAlpha(c) && (c < '0' || c > '9') && c != '+' && c != '-' && c != '.' {
			return false
		}
	}
	return true
}

func isAlpha(c byte) bool { return c|0x20 >= 'a' && c|0x20 <= 'z' }

// plainPath says the path in p, its first n bytes, before any query or
// fragment, needs no work: no escape, empty or dot segment. Most requests
// are like that, and need no copy.
func plainPath(p string) (n int, ok bool) {
	for i := 0; i < len(p); i++ {
		switch p[i] {
		case '?', '#':
			return i, true
		case '%':
			return 0, false
		case '/':
			if i+1 < len(p) && (p[i+1] == '/' || p[i+1] == '.') {
				return 0, false
			}
		}
	}
	return len(p), true
}

// The states of normalize: where in a segment the last byte left it.
const (
	inSegment = iota // after an ordinary byte
	atSlash          // just after a "/"
	atDot            // after "/."
	atDotDot         // after "/.."
)

// normalize is nginx's ngx_http_parse_complex_uri with merge_slashes on, for
// a p that starts with "/". target is for the error messages.
func normalize(p, target string) (string, error) {
	out := make([]byte, 0, len(p))
	state := inSegment
loop:
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch c {
		case '?', '#':
			break loop
		case '%':
			if i+2 >= len(p) || unhex(p[i+1]) < 0 || unhex(p[i+2]) < 0 {
				return "", fmt.Errorf("%w: bad percent-encoding in target %q", ErrMalformed, trunc(target))
			}
			c = byte(unhex(p[i+1])<<4 | unhex(p[i+2]))
			i += 2
			switch c {
			case 0:
				return "", fmt.Errorf("%w: %%00 in target %q", ErrMalformed, trunc(target))
			case '%', '?', '#':
				// nginx keeps these as they are, whatever state it is in.
				out = append(out, c)
				state = inSegment
				continue
			}
		}
		// c, as sent or decoded, is a path byte.
		switch {
		case c == '/' && state == atSlash:
			// merge_slashes
		case c == '/' && state == atDot:
			out = out[:len(out)-1] // "/./" is "/"
			state = atSlash
		case c == '/' && state == atDotDot:
			var ok bool
			if out, ok = dropSegment(out); !ok {
				return "", fmt.Errorf("%w: target %q climbs above the root", ErrMalformed, trunc(target))
			}
			state = atSlash
		case c == '/':
			out = append(out, c)
			state = atSlash
		case c == '.' && state == atSlash:
			out = append(out, c)
			state = atDot
		case c == '.' && state == atDot:
			out = append(out, c)
			state = atDotDot
		default:
			out = append(out, c)
			state = inSegment
		}
	}
	switch state {
	case atDot:
		out = out[:len(out)-1] // a last "/." is "/"
	case atDotDot:
		var ok bool
		if out, ok = dropSegment(out); !ok {
			return "", fmt.Errorf("%w: target %q climbs above the root", ErrMalformed, trunc(target))
		}
	}
	return string(out), nil
}

// dropSegment takes the "/.." at the end of out and the segment before it
// away, leaving its "/". There is none before a "/.." at the start.
func dropSegment(out []byte) ([]byte, bool) {
	prefix := out[:len(out)-len("/..")]
	if len(prefix) == 0 {
		return out, false
	}
	return out[:bytes.LastIndexByte(prefix, '/')+1], true
}

func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c|0x20 >= 'a' && c|0x20 <= 'f':
		return int(c|0x20-'a') + 10
	}
	return -1
}
