package admin

import (
	"net/netip"
	"strings"
	"testing"
)

func TestConnFilter(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	c1 := netip.MustParseAddrPort("10.77.0.10:4000")
	c2 := netip.MustParseAddrPort("10.77.1.10:4001")
	type row struct {
		client netip.AddrPort
		be     netip.Addr
		state  string
	}
	rows := []row{{c1, be1, "HANDOFFED"}, {c2, be1, "TIME_WAIT"}, {c1, be2, "HANDOFFING"}, {c2, netip.Addr{}, "ESTABLISHED busy"}}
	for args, want := range map[string]string{
		"":                                 "1111",
		"be=10.0.0.11":                     "1100",
		"state=handoffed":                  "1000",
		"state=ESTABLISHED":                "0001",
		"client=10.77.0.10":                "1010",
		"client=10.77.0.0/16":              "1111",
		"client=10.77.1.0/24":              "0101",
		"client=10.77.0.10:4000":           "1010",
		"client=10.77.1.10:4000":           "0000",
		"be=10.0.0.11 client=10.77.1.10":   "0100",
		"be=10.0.0.12 state=HANDOFFING":    "0010",
		"be=10.0.0.12 state=time_wait":     "0000",
		"state=handoffed client=10.77.0.9": "0000",
	} {
		f, err := ParseConnFilter(strings.Fields(args))
		if err != nil {
			t.Fatalf("%q: %v", args, err)
		}
		got := ""
		for _, r := range rows {
			if f.Match(r.client, r.be, r.state) {
				got += "1"
			} else {
				got += "0"
			}
		}
		if got != want {
			t.Errorf("%q: %s, want %s", args, got, want)
		}
	}
	for _, bad := range []string{"be=x", "client=nope", "state=", "port=80", "be=10.0.0.1 be=10.0.0.2", "10.0.0.1"} {
		if _, err := ParseConnFilter(strings.Fields(bad)); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	// The server refuses bad filters and arities before a handler sees them.
	for _, bad := range []string{"conns be=x", "conns a=1 b=2 c=3 d=4", "clear", "clear all", "kill", "maint"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
	for _, good := range []string{"conns", "conns be=10.0.0.1 state=handoffed client=10.0.0.0/8", "clear counters", "kill 10.0.0.1",
		"maint 10.0.0.1", "ready 10.0.0.1", "rules", "rates", "json status"} {
		if _, err := Parse(good); err != nil {
			t.Errorf("Parse(%q): %v", good, err)
		}
	}
}
