package backends

import (
	"net/netip"
	"regexp"
)

// Server is one `server = ADDR PORT` line: a BE and its handoff port.
type Server struct {
	Addr netip.Addr
	Port uint16
}

// AddrPort returns the BE's handoff listener address.
func (s Server) AddrPort() netip.AddrPort { return netip.AddrPortFrom(s.Addr, s.Port) }

// Rule is one `rule = TARGET PATTERN` line. Target is a BE address, or the
// zero Addr with Local set for the FE's local node (seed 4.7).
type Rule struct {
	Target  netip.Addr
	Local   bool
	Pattern *regexp.Regexp
	Line    int
}

// TargetString names the rule's target as it is written in the file.
func (r Rule) TargetString() string {
	if r.Local {
		return "local"
	}
	return r.Target.String()
}
