package admin

import (
	"fmt"
	"net/netip"
	"strings"
)

// ConnFilter is `tcphactl conns`'s filters: be=ADDR, state=STATE and
// client=ADDR, ADDR:PORT or PREFIX/BITS; a row shows when it passes each
// filter given, as ipvsadm's and HAProxy's `show sess` selections do.
type ConnFilter struct {
	BE     netip.Addr     // invalid: any
	State  string         // upper case; empty: any
	Client netip.Prefix   // invalid: any
	Port   netip.AddrPort // a client=ADDR:PORT: that one connection
}

// ParseConnFilter reads conns's arguments.
func ParseConnFilter(args []string) (ConnFilter, error) {
	var f ConnFilter
	seen := map[string]bool{}
	for _, a := range args {
		k, v, ok := strings.Cut(a, "=")
		if !ok || v == "" || seen[k] {
			return f, fmt.Errorf("conns %q: want be=ADDR, state=STATE or client=ADDR, each once", a)
		}
		seen[k] = true
		switch k {
		case "be":
			ad, err := netip.ParseAddr(v)
			if err != nil {
				return f, fmt.Errorf("conns be=%q: not an address", v)
			}
			f.BE = ad
		case "state":
			f.State = strings.ToUpper(v)
		case "client":
			if ap, err := netip.ParseAddrPort(v); err == nil {
				f.Port = ap
				continue
			}
			if p, err := netip.ParsePrefix(v); err == nil {
				f.Client = p.Masked()
				continue
			}
			ad, err := netip.ParseAddr(v)
			if err != nil {
				return f, fmt.Errorf("conns client=%q: want ADDR, ADDR:PORT or PREFIX/BITS", v)
			}
			f.Client = netip.PrefixFrom(ad, ad.BitLen())
		default:
			return f, fmt.Errorf("conns %q: want be=ADDR, state=STATE or client=ADDR", a)
		}
	}
	return f, nil
}

// Match tells whether a connection of client, on be (invalid: none yet,
// or a BE's own row), in state passes the filter. A state matches its
// first word (a BE's "ESTABLISHED busy" is ESTABLISHED), in any case.
func (f ConnFilter) Match(client netip.AddrPort, be netip.Addr, state string) bool {
	if f.BE.IsValid() && be != f.BE {
		return false
	}
	if f.State != "" {
		first, _, _ := strings.Cut(state, " ")
		if strings.ToUpper(first) != f.State {
			return false
		}
	}
	if f.Port.IsValid() && client != f.Port {
		return false
	}
	if f.Client.IsValid() && !f.Client.Contains(client.Addr()) {
		return false
	}
	return true
}
