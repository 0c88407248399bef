package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"tcpha/admin"
	"tcpha/config"
	"tcpha/internal/testlog"
)

func TestNewLoggerLevels(t *testing.T) {
	cases := map[int]slog.Level{0: slog.LevelError, 1: slog.LevelError, 2: slog.LevelWarn, 3: slog.LevelWarn,
		4: slog.LevelInfo, 5: slog.LevelDebug, 6: slog.LevelDebug}
	for lvl, want := range cases {
		var buf bytes.Buffer
		log, err := NewLogger(config.Global{LogLevel: lvl}, &buf, false)
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		if !log.Enabled(ctx, want) || (want > slog.LevelDebug && log.Enabled(ctx, want-4)) {
			t.Errorf("loglevel %d: %v not enabled, or a lower level is", lvl, want)
		}
	}
	var buf bytes.Buffer
	log, _ := NewLogger(config.Global{LogLevel: 4}, &buf, false)
	log.Debug("hidden")
	log.SetLevel(6)
	log.Debug("shown")
	if s := buf.String(); strings.Contains(s, "hidden") || !strings.Contains(s, "shown") {
		t.Errorf("after SetLevel: %q", s)
	}
	path := filepath.Join(t.TempDir(), "tcpha.log")
	log, err := NewLogger(config.Global{LogLevel: 4, LogFile: path}, io.Discard, false)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("hello", "op", "test")
	// logrotate moves the file away; a reopen writes to a new one.
	os.Rename(path, path+".1")
	log.Info("to the old file")
	if err := log.Reopen(); err != nil {
		t.Fatal(err)
	}
	log.Info("to the new file")
	log.Close()
	if b, _ := os.ReadFile(path + ".1"); !strings.Contains(string(b), "msg=hello op=test") || !strings.Contains(string(b), "to the old file") {
		t.Errorf("rotated logfile holds %q", b)
	}
	if b, _ := os.ReadFile(path); !strings.Contains(string(b), "to the new file") || strings.Contains(string(b), "hello") {
		t.Errorf("reopened logfile holds %q", b)
	}
	if _, err := NewLogger(config.Global{LogFile: "/nonexistent/dir/x.log"}, io.Discard, false); err == nil {
		t.Error("unwritable logfile accepted")
	}
}

// The agent's logger, whatever it writes to, limits a flood of one message:
// its first lines, then one line with the count (issue 19: a stranger's
// connections wrote 4.5 MB of refusals in 10 s).
func TestLoggerLimitsFloods(t *testing.T) {
	for _, journal := range []bool{false, true} {
		synctest.Test(t, func(t *testing.T) {
			var buf testlog.Buffer
			log, err := NewLogger(config.Global{LogLevel: 4}, &buf, journal)
			if err != nil {
				t.Fatal(err)
			}
			l := log.With("role", "be")
			for i := range 85606 {
				l.Warn("control session refused", "op", "control", "peer", fmt.Sprintf("10.0.0.2:%d", 1024+i%60000))
			}
			time.Sleep(logLimits.Interval + time.Second)
			lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
			if n := logLimits.Burst + 1; len(lines) != n || !strings.HasSuffix(lines[n-1], fmt.Sprintf("repeated=%d", 85606-logLimits.Burst)) {
				t.Errorf("journal=%v: %d lines, want %d, the last with the count: %s", journal, len(lines), n, lines[len(lines)-1])
			}
		})
	}
}

// Under systemd each line starts with its syslog priority.
func TestJournalPriorities(t *testing.T) {
	var buf bytes.Buffer
	log, err := NewLogger(config.Global{LogLevel: 6}, &buf, true)
	if err != nil {
		t.Fatal(err)
	}
	l := log.With("role", "fe")
	l.Error("e")
	l.Warn("w")
	l.Info("i")
	l.Debug("d")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	for i, p := range []string{"<3>", "<4>", "<6>", "<7>"} {
		if i >= len(lines) || !strings.HasPrefix(lines[i], p+"time=") || !strings.Contains(lines[i], "role=fe") {
			t.Errorf("line %d: %q, want it to start with %s", i, lines, p)
		}
	}
}

// The agent's commands refuse what its roles cannot do, and change what
// they can.
func TestAdminCommands(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := admin.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lg, _ := NewLogger(config.Global{}, io.Discard, false)
	r := &runner{lg: lg, log: lg.Logger, handovers: make(chan handoverReq), reloads: make(chan chan error)}
	go (&admin.Server{Handle: r.command, Log: lg.Logger}).Serve(ctx, ln)
	for cmd, want := range map[string]string{
		"conns":           "error: conns: this host has no fe or be role",
		"loglevel 9":      "error: loglevel \"9\": want 0 to 6",
		"json loglevel 5": "ok\n{\n  \"loglevel\": 5\n}",
		"loglevel 4":      "ok\nloglevel 4",
		"drain 10.0.0.1":  "error: drain: this host has no fe role",
		"json status":     "ok\n{\n  \"pid\":",
	} {
		out, err := admin.Do(path, cmd, time.Second)
		got := "ok\n" + out
		if err != nil {
			got = "error: " + err.Error()
		}
		if !strings.HasPrefix(got, want) {
			t.Errorf("%q: got %q, want it to start with %q", cmd, got, want)
		}
	}
}
