package agent

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tcpha/config"
)

func TestNewLoggerLevels(t *testing.T) {
	cases := map[int]slog.Level{0: slog.LevelError, 1: slog.LevelError, 2: slog.LevelWarn, 3: slog.LevelWarn,
		4: slog.LevelInfo, 5: slog.LevelDebug, 6: slog.LevelDebug}
	for lvl, want := range cases {
		var buf bytes.Buffer
		log, closer, err := NewLogger(config.Global{LogLevel: lvl}, &buf)
		if err != nil {
			t.Fatal(err)
		}
		closer.Close()
		ctx := context.Background()
		if !log.Enabled(ctx, want) || (want > slog.LevelDebug && log.Enabled(ctx, want-4)) {
			t.Errorf("loglevel %d: %v not enabled, or a lower level is", lvl, want)
		}
	}
	path := filepath.Join(t.TempDir(), "tcpha.log")
	log, closer, err := NewLogger(config.Global{LogLevel: 4, LogFile: path}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("hello", "op", "test")
	closer.Close()
	if b, _ := os.ReadFile(path); !strings.Contains(string(b), "msg=hello op=test") {
		t.Errorf("logfile holds %q", b)
	}
	if _, _, err := NewLogger(config.Global{LogFile: "/nonexistent/dir/x.log"}, io.Discard); err == nil {
		t.Error("unwritable logfile accepted")
	}
}

// The admin socket refuses to take over from a running agent, but replaces
// the stale file a crashed one left.
func TestAdminSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "admin.sock")
	ln, err := listenAdmin(path)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := listenAdmin(path); err == nil || !strings.Contains(err.Error(), "another agent") {
		t.Errorf("second agent on a live socket: %v", err)
	}
	// A crash: the socket file stays, and nobody answers on it.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("no stale socket file to test with: %v", err)
	}
	ln2, err := listenAdmin(path)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	defer ln2.Close()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go serveAdmin(ctx, ln2, nil, nil, slog.New(slog.NewTextHandler(io.Discard, nil)), make(chan handoverReq))
	ask := func(cmd string) string {
		c, err := net.DialTimeout("unix", path, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, cmd+"\n")
		b, _ := io.ReadAll(c)
		return string(b)
	}
	if got := ask("conns"); !strings.Contains(got, "no fe role") {
		t.Errorf("conns without an FE: %q", got)
	}
	if got := ask("bogus"); !strings.Contains(got, `unknown command "bogus"`) {
		t.Errorf("unknown command: %q", got)
	}
}
