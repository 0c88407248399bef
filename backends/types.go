package backends

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
)

// Server is one `server = ADDR PORT [weight=N]` line: a BE, its handoff
// port and its weight (1 unless given; 0 takes no new connections).
type Server struct {
	Addr   netip.Addr
	Port   uint16
	Weight int
}

// AddrPort returns the BE's handoff listener address.
func (s Server) AddrPort() netip.AddrPort { return netip.AddrPortFrom(s.Addr, s.Port) }

// MaxWeight bounds a server's weight.
const MaxWeight = 10000

// Rule is one `rule = TARGETS [scheduler=POLICY] [host=HOST] [PATTERN]`
// line: the BEs a request whose host matches Host and whose path matches
// Pattern may go to, or the FE's local node (seed 4.7) when Local is set
// and Targets is empty. A nil Host matches every request, a nil Pattern
// every path.
type Rule struct {
	Targets []netip.Addr
	Local   bool
	Host    *HostPattern
	Pattern *regexp.Regexp
	// Policy picks among several targets; empty: the table's.
	Policy Policy
	Line   int
}

// TargetString names the rule's targets as they are written in the file.
func (r Rule) TargetString() string {
	if r.Local {
		return "local"
	}
	s := make([]string, len(r.Targets))
	for i, t := range r.Targets {
		s[i] = t.String()
	}
	return strings.Join(s, ",")
}

// Policy is how a rule with several BEs picks one.
type Policy string

const (
	// RoundRobin takes the BEs in turn, as often as their weights say
	// (smooth weighted round robin).
	RoundRobin Policy = "rr"
	// WLC takes the BE with the fewest connections for its weight; ties go
	// round robin.
	WLC Policy = "wlc"
	// LARD is Locality-Aware Request Distribution (Pai et al., ASPLOS
	// 1998): each path is bound to one BE, so that BE's cache holds it,
	// and moves to the least loaded BE only when its own is overloaded.
	LARD Policy = "lard"
)

// ParsePolicy reads a scheduler name.
func ParsePolicy(s string) (Policy, error) {
	switch p := Policy(s); p {
	case RoundRobin, WLC, LARD:
		return p, nil
	}
	return "", fmt.Errorf("unknown scheduler %q (want rr, wlc or lard)", s)
}

// Table is the FE's scheduling as a config file gives it: its servers, its
// rules in order, and the default policy.
type Table struct {
	Servers []Server
	Rules   []Rule
	Policy  Policy
}

// Registration is a BE that registered itself (seed 4.10): its server
// entry and its own rules, whose targets are all itself.
type Registration struct {
	Server Server
	Rules  []Rule
}

// Request is what rules match: the host (phttp.RouteHost; the SNI of a TLS
// connection) and the path as the web server will see it (phttp.RoutePath).
type Request struct {
	Host, Path string
	// TLS says q is a TLS connection's ClientHello: Host is its SNI ("" for
	// none) and the path is encrypted, so path patterns are not consulted.
	TLS bool
}

// Matches tells whether the rule takes q. A TLS connection is matched by
// host= alone: a rule with host= takes the names it matches, one without
// takes every connection, and one without SNI goes to the first rule
// without host= (issue 16), even if that rule's host= pattern would match
// the empty name.
func (r Rule) Matches(q Request) bool {
	if q.TLS {
		return r.Host == nil || q.Host != "" && r.Host.Match(q.Host)
	}
	if r.Host != nil && !r.Host.Match(q.Host) {
		return false
	}
	return r.Pattern == nil || r.Pattern.MatchString(q.Path)
}

// PatternString is the rule's path pattern as written, "" for a rule
// without one.
func (r Rule) PatternString() string {
	if r.Pattern == nil {
		return ""
	}
	return r.Pattern.String()
}

// HostPattern is a rule's `host=` regular expression. Unlike a path
// pattern it must match the whole host, case-insensitively:
// `host=example\.com` would otherwise also take evilexample.com.attacker,
// and names are case-insensitive (RFC 4343).
type HostPattern struct {
	text string
	re   *regexp.Regexp
}

// CompileHost compiles a `host=` pattern.
func CompileHost(text string) (*HostPattern, error) {
	if text == "" {
		return nil, errors.New("empty host pattern")
	}
	re, err := regexp.Compile(`(?i)^(?:` + text + `)$`)
	if err != nil {
		return nil, err
	}
	return &HostPattern{text: text, re: re}, nil
}

// Match tells whether host matches; a request without a host matches no
// host pattern.
func (h *HostPattern) Match(host string) bool { return host != "" && h.re.MatchString(host) }

// String is the pattern as written.
func (h *HostPattern) String() string { return h.text }

// CompileRule builds a rule from its parts as they travel between agents
// (a cluster frame, a registration, an upgrade): the host and path
// patterns as text (an empty one matches everything, but not both), the
// policy as a name, empty for the table's.
func CompileRule(targets []netip.Addr, local bool, policy, host, pattern string) (Rule, error) {
	r := Rule{Targets: targets, Local: local, Policy: Policy(policy)}
	if policy != "" {
		if _, err := ParsePolicy(policy); err != nil {
			return Rule{}, err
		}
	}
	if host == "" && pattern == "" {
		return Rule{}, errors.New("a rule needs a host or a path pattern")
	}
	if host != "" {
		h, err := CompileHost(host)
		if err != nil {
			return Rule{}, fmt.Errorf("bad host pattern %q: %w", host, err)
		}
		r.Host = h
	}
	if pattern != "" {
		re, err := regexp.Compile(pattern)
		if err != nil {
			return Rule{}, fmt.Errorf("bad regular expression %q: %w", pattern, err)
		}
		r.Pattern = re
	}
	return r, nil
}

// Registered builds the registration of the BE be: its server entry and
// one rule per pattern, each naming only be.
func Registered(be netip.AddrPort, weight int, patterns []string) (Registration, error) {
	if weight > MaxWeight {
		return Registration{}, fmt.Errorf("weight %d over %d", weight, MaxWeight)
	}
	reg := Registration{Server: Server{Addr: be.Addr(), Port: be.Port(), Weight: weight}}
	for _, pat := range patterns {
		r, err := CompileRule([]netip.Addr{be.Addr()}, false, "", "", pat)
		if err != nil {
			return Registration{}, err
		}
		reg.Rules = append(reg.Rules, r)
	}
	return reg, nil
}
