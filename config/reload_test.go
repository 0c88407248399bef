package config

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"tcpha/backends"
)

// A reload applies the FE's scheduling and timings, a BE's FEs and the log
// level; every other change is named as needing an upgrade, once.
func TestUnreloadable(t *testing.T) {
	old := &Config{
		Global: Global{LogLevel: 4, Admin: "/run/a.sock", HandoverWait: time.Second},
		FE:     &FE{VAddr: netip.MustParseAddr("10.0.0.100"), Port: 80, DtcInterval: time.Second, PHTTP: "single"},
		BE:     &BE{Port: 666, FEAddrs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
	}
	same := func() *Config {
		c := *old
		fe, be := *old.FE, *old.BE
		c.FE, c.BE = &fe, &be
		return &c
	}
	if got := Unreloadable(old, same()); len(got) != 0 {
		t.Errorf("no change: %v", got)
	}
	next := same()
	next.Global.LogLevel = 6
	next.FE.DtcInterval, next.FE.PHTTP, next.FE.Rise = 0, "multi", 3
	next.BE.FEAddrs = nil
	// The web server check applies to the next probe.
	next.FE.Check, next.BE.Check.Expect = backends.DefaultCheck, backends.Expect{{Lo: 200, Hi: 200}}
	if got := Unreloadable(old, next); len(got) != 0 {
		t.Errorf("reloadable changes: %v", got)
	}
	next.Global.Admin, next.Global.HandoverWait = "/run/b.sock", time.Minute
	// The access log, like the log file, is reopened at the path it was
	// opened at: a new path needs an upgrade.
	next.Global.AccessLog = "/var/log/tcpha/access.log"
	next.FE.Port = 8080
	next.BE.Port = 667
	want := []string{"[global] accesslog", "[global] admin", "[global] handoverwait", "[fe] port", "[be] port"}
	if got := Unreloadable(old, next); !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	next = same()
	next.BE = nil
	if got := Unreloadable(old, next); !slices.Equal(got, []string{"the roles ([fe], [be] sections)"}) {
		t.Errorf("a role gone: %v", got)
	}
}
