package relay

import "net/netip"

// Rules is what the FE's rules (its last cluster frame) say of a later
// request's path, as the BE holding the connection sees them. Each web
// server is given as the pool of connections to it; nil is this BE's own.
type Rules struct {
	// Here: this BE takes connections now and is among the usable BEs of
	// the first matching rule that has any (backends.Scheduler.Holds): the
	// request is this BE's.
	Here bool
	// Usable: the BEs that take connections now, of every matching rule,
	// in the order the FE would try them (backends.Scheduler.Route).
	Usable []*Pool
	// Named: every BE the matching rules name, in rule order, whether it
	// takes connections now or not (agent stopped, NOTAVAILABLE, draining,
	// weight 0): the web server of one whose agent is out may still
	// answer.
	Named []*Pool
	// To: for a first request this BE accepted (accept = be), the BEs its
	// scheduler chose, best first (wlc, lard by the FE's load view): the
	// connection moves to them, not to where the mover would route the
	// request (which keeps it here when the rule names this BE).
	To []netip.Addr
}

// Plan is where a later request of a connection goes.
type Plan struct {
	// Here: served from this BE's web server.
	Here bool
	// Move: another BE takes connections now; with phttp = multi the
	// connection moves there, and Pools serve the request only if the
	// move fails.
	Move bool
	// Pools: otherwise the request is fetched from the first of these web
	// servers that answers (nil: this BE's own; back-end forwarding); none
	// answering, or none at all, gets 503.
	Pools []*Pool
	// To: Rules.To, for the mover.
	To []netip.Addr
}

// here is the plan of a request that is this BE's.
var here = Plan{Here: true}

// Decide says where a later request goes by what the rules say of it. A
// request is never served by a BE the rules do not name for it: this BE's
// web server serves it only when a matching rule names this BE and this BE
// takes connections now (Here, or listed in Usable behind the BEs tried
// first). When no BE named takes connections (say another BE's agent
// stopped while its web server runs), the request is fetched from the
// named BEs' web servers, or answered 503 if none answers; it is not served
// here as though the rules had said nothing.
func Decide(r Rules) Plan {
	if r.Here {
		return here
	}
	if len(r.Usable) > 0 {
		p := Plan{Pools: r.Usable, To: r.To}
		for _, u := range r.Usable {
			p.Move = p.Move || u != nil
		}
		return p
	}
	var pools []*Pool
	for _, n := range r.Named {
		// This BE named but taking no connections (draining, down by the
		// FE's probes): not eligible to serve.
		if n != nil {
			pools = append(pools, n)
		}
	}
	return Plan{Pools: pools}
}
