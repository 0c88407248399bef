package backends_test

import (
	"net/netip"
	"reflect"
	"testing"
	"time"

	"tcpha/backends"
	"tcpha/config"
)

func mustConfig(t *testing.T, text string) *config.FE {
	t.Helper()
	c, err := config.Parse("t.conf", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	return c.FE
}

func TestCandidates(t *testing.T) {
	fe := mustConfig(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666
server = 10.0.0.12 777
rule = 10.0.0.12 \.jpg$
rule = local ^/status$
rule = 10.0.0.11 .*
rule = 10.0.0.12 ^/img/
`)
	h := backends.NewHealth()
	s := backends.NewScheduler(fe.Rules, fe.Servers, h)
	be1 := backends.Target{BE: netip.MustParseAddrPort("10.0.0.11:666")}
	be2 := backends.Target{BE: netip.MustParseAddrPort("10.0.0.12:777")}
	local := backends.Target{Local: true}
	cases := []struct {
		path string
		want []backends.Target
	}{
		{"/index.html", []backends.Target{be1}},
		{"/img/a.jpg", []backends.Target{be2, be1}}, // be2 listed once although two rules name it
		{"/a.jpg.html", []backends.Target{be1}},     // regexps are anchored only where they say so
		{"/status", []backends.Target{local, be1}},
		{"/img/b.png", []backends.Target{be1, be2}},
	}
	for _, tc := range cases {
		if got := s.Candidates(tc.path); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.path, got, tc.want)
		}
	}
	// A BE marked down is skipped until it is up again.
	now := time.Unix(1000, 0)
	if !h.Set(be2.BE.Addr(), false, now) {
		t.Error("marking down reported no change")
	}
	if h.Set(be2.BE.Addr(), false, now.Add(time.Second)) {
		t.Error("marking down twice reported a change")
	}
	if since, down := h.DownSince(be2.BE.Addr()); !down || !since.Equal(now) {
		t.Errorf("down since %v %v", since, down)
	}
	if got := s.Candidates("/img/a.jpg"); !reflect.DeepEqual(got, []backends.Target{be1}) {
		t.Errorf("with be2 down: %v", got)
	}
	h.Set(be2.BE.Addr(), true, now)
	if got := s.Candidates("/img/a.jpg"); len(got) != 2 {
		t.Errorf("be2 back up: %v", got)
	}
	if got := s.Candidates("/nomatch-possible"); len(got) != 1 {
		t.Errorf("catch-all: %v", got)
	}
}

func TestRoute(t *testing.T) {
	fe := mustConfig(t, `[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666
server = 10.0.0.12 666
rule = local ^/status$
rule = 10.0.0.12 \.jpg$
rule = local ^/img/
rule = 10.0.0.11 ^/img/
`)
	h := backends.NewHealth()
	s := backends.NewScheduler(fe.Rules, fe.Servers, h)
	be1 := netip.MustParseAddrPort("10.0.0.11:666")
	be2 := netip.MustParseAddrPort("10.0.0.12:666")
	cases := []struct {
		path string
		want backends.Route
	}{
		{"/status", backends.Route{Local: true}},                                     // local first: no BE tried
		{"/img/a.jpg", backends.Route{BEs: []netip.AddrPort{be2, be1}, Local: true}}, // local is the fallback
		{"/a.jpg", backends.Route{BEs: []netip.AddrPort{be2}}},
		{"/img/b.png", backends.Route{Local: true}},
		{"/other", backends.Route{}}, // no rule matches: the FE answers 503
	}
	for _, tc := range cases {
		if got := s.Route(tc.path); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %+v, want %+v", tc.path, got, tc.want)
		}
	}
	// be2 down: the next matching rule, `local ^/img/`, is now the first choice.
	h.Set(be2.Addr(), false, time.Unix(0, 0))
	if got := s.Route("/img/a.jpg"); !reflect.DeepEqual(got, backends.Route{Local: true}) {
		t.Errorf("be2 down: %+v", got)
	}
}
