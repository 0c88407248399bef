package config

import (
	"maps"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
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

// The README's and tcpha.conf(5)'s reload paragraphs name exactly what a
// reload applies: each reloadable field's key, and, as needing an upgrade,
// the bounds and timers issue 18 found the README claimed were swapped.
func TestReloadDocumented(t *testing.T) {
	keys := map[string]string{"Servers": "server", "Rules": "rule", "Scheduler": "scheduler", "Rise": "rise",
		"Fall": "fall", "DtcInterval": "dtcinterval", "HandoffTimeout": "handofftimeout", "PHTTP": "phttp",
		"LogLevel": "loglevel", "FEAddrs": "feaddr", "Check": "check"}
	fixed := []string{"maxheader", "requesttimeout", "timewait", "idletimeout", "maxclients", "maxconnperip", "drain"}
	for _, f := range slices.Concat(reloadableGlobal, reloadableFE, reloadableBE) {
		if keys[f] == "" {
			t.Errorf("reloadable field %s has no key in this test: add it, and to the docs", f)
		}
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	para := string(readme)
	if i := strings.Index(para, "- **Reload.**"); i >= 0 {
		para = para[i:]
		if j := strings.Index(para[1:], "\n- "); j >= 0 {
			para = para[:j+1]
		}
	} else {
		t.Fatal("README.md has no Reload paragraph")
	}
	for _, k := range keys {
		if !strings.Contains(para, "`"+k+"`") {
			t.Errorf("README's Reload paragraph does not name `%s`, which a reload applies:\n%s", k, para)
		}
	}
	for _, k := range fixed {
		if !strings.Contains(para, "`"+k+"`") {
			t.Errorf("README's Reload paragraph does not name `%s` as needing an upgrade:\n%s", k, para)
		}
	}
	man, err := os.ReadFile("../man/tcpha.conf.5")
	if err != nil {
		t.Fatal(err)
	}
	sec := string(man)
	if i := strings.Index(sec, ".SH RELOAD"); i >= 0 {
		sec = sec[i:]
		if j := strings.Index(sec[1:], "\n.SH "); j >= 0 {
			sec = sec[:j+1]
		}
	} else {
		t.Fatal("tcpha.conf.5 has no RELOAD section")
	}
	for _, k := range append(slices.Collect(maps.Values(keys)), fixed...) {
		if !regexp.MustCompile(`\b` + k + `\b`).MatchString(sec) {
			t.Errorf("tcpha.conf(5) RELOAD does not name %s:\n%s", k, sec)
		}
	}
	// And the code agrees: a change of each fixed key is named.
	old := &Config{FE: &FE{}, BE: &BE{}}
	next := &Config{FE: &FE{MaxHeader: 1, RequestTimeout: 1, TimeWait: 1, IdleTimeout: 1, MaxClients: 1, MaxConnPerIP: 1, Drain: 1}, BE: &BE{}}
	got := Unreloadable(old, next)
	for _, k := range fixed {
		if !slices.Contains(got, "[fe] "+k) {
			t.Errorf("Unreloadable %v does not name [fe] %s", got, k)
		}
	}
}
