package agent

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"tcpha/config"
)

// The config's warnings reach the log, one line each, with the op that
// read the file (issue 18, item 6).
func TestLogWarnings(t *testing.T) {
	cfg, err := config.Parse("w.conf", []byte("[fe]\nvaddr = 10.0.0.100\nrule = local ^/a\n"))
	if err != nil || len(cfg.Warnings) != 1 {
		t.Fatalf("parse: %v, warnings %q", err, cfg.Warnings)
	}
	var buf bytes.Buffer
	logWarnings(slog.New(slog.NewTextHandler(&buf, nil)), "reload", cfg)
	want := `level=WARN msg="config warning" op=reload file=w.conf warning="w.conf:3: [fe] rule: no catch-all rule`
	if !strings.Contains(buf.String(), want) {
		t.Errorf("log = %q, want %q", buf.String(), want)
	}
}
