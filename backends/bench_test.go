package backends_test

import (
	"fmt"
	"strings"
	"testing"

	"tcpha/backends"
)

// Ten rules, the match in the last one: the worst case for first-match.
func BenchmarkRoute(b *testing.B) {
	var conf strings.Builder
	conf.WriteString("[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\n")
	for i := range 9 {
		fmt.Fprintf(&conf, "rule = 10.0.0.11 ^/section%d/.*\\.(php|cgi)$\n", i)
	}
	conf.WriteString("rule = 10.0.0.11 .*\n")
	s := newScheduler(b, conf.String(), backends.Options{})
	b.ReportAllocs()
	for b.Loop() {
		if len(s.Route(req("/img/photos/2026/a.jpg")).BEs) != 1 {
			b.Fatal("no candidate")
		}
	}
}
