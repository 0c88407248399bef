package metrics

import (
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

func scrape(m *Metrics) string {
	w := httptest.NewRecorder()
	promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}).ServeHTTP(w, httptest.NewRequest("GET", "/metrics", nil))
	return w.Body.String()
}

// tcpha_build_info names the version; the reload gauges start as the
// start's load and follow each reload, refused or not.
func TestBuildInfoAndReloads(t *testing.T) {
	m := New()
	text := scrape(m)
	for _, want := range []string{
		`tcpha_build_info{goversion="go`,
		`tcpha_config_last_reload_successful 1`,
		`tcpha_config_reloads_total{result="ok"} 0`,
		`tcpha_config_reloads_total{result="refused"} 0`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("at start, no %q in:\n%s", want, text)
		}
	}
	if !strings.Contains(text, `,version="`) {
		t.Errorf("tcpha_build_info without a version label:\n%s", text)
	}
	m.ObserveReload(false, time.Unix(1700000000, 0))
	text = scrape(m)
	for _, want := range []string{
		`tcpha_config_last_reload_successful 0`,
		`tcpha_config_last_reload_timestamp_seconds 1.7e+09`,
		`tcpha_config_reloads_total{result="refused"} 1`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("after a refused reload, no %q in:\n%s", want, text)
		}
	}
	m.ObserveReload(true, time.Unix(1700000060, 0))
	text = scrape(m)
	for _, want := range []string{
		`tcpha_config_last_reload_successful 1`,
		`tcpha_config_last_reload_timestamp_seconds 1.70000006e+09`,
		`tcpha_config_reloads_total{result="ok"} 1`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("after a reload, no %q in:\n%s", want, text)
		}
	}
}
