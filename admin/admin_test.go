package admin

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The admin socket refuses to take over from a running agent, but replaces
// the stale file a crashed one left.
func TestListen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "admin.sock")
	ln, err := Listen(path)
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
	if _, err := Listen(path); !errors.Is(err, ErrAgentRunning) {
		t.Errorf("second agent on a live socket: %v", err)
	}
	// A crash: the socket file stays, and nobody answers on it.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("no stale socket file to test with: %v", err)
	}
	ln2, err := Listen(path)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	ln2.Close()
}

// The server checks a request before its handler sees it, answers in text
// or JSON, and passes a successor's line on with the connection; Do reads
// the answers as tcphactl and the tests need them.
func TestServerAndDo(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var got []Request
	succ := make(chan bool, 1)
	s := &Server{
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Handle: func(r Request) (any, string, error) {
			got = append(got, r)
			if r.Cmd == "drain" {
				return nil, "", errors.New("drain: no such BE")
			}
			return map[string]int{"loglevel": 5}, "loglevel 5\n", nil
		},
		Successor: func(_ context.Context, c *net.UnixConn, force bool) {
			io.WriteString(c, "start\n")
			c.Close()
			succ <- force
		},
	}
	go s.Serve(ctx, ln)
	for req, want := range map[string]string{
		"bogus":             `unknown command "bogus"`,
		"":                  "want status",
		"weight 10.0.0.1":   "weight takes 2 argument(s), got 1",
		"status extra args": "status takes 0 argument(s), got 2",
		"drain 10.0.0.1":    "drain: no such BE",
	} {
		var refused *RefusedError
		if _, err := Do(path, req, time.Second); !errors.As(err, &refused) || !strings.HasPrefix(refused.Why, want) {
			t.Errorf("%q: %v, want a refusal saying %q", req, err, want)
		}
	}
	if out, err := Do(path, "loglevel 5", time.Second); err != nil || out != "loglevel 5\n" {
		t.Errorf("text: %q %v", out, err)
	}
	if out, err := Do(path, "json loglevel 5", time.Second); err != nil || out != "{\n  \"loglevel\": 5\n}\n" {
		t.Errorf("json: %q %v", out, err)
	}
	if len(got) != 3 || got[0].Cmd != "drain" || !got[2].JSON || got[2].Args[0] != "5" {
		t.Errorf("the handler saw %+v", got)
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "upgrade\n")
	if b, _ := io.ReadAll(c); string(b) != "start\n" || !<-succ {
		t.Errorf("successor: %q", b)
	}
	c.Close()
	if _, err := Do(filepath.Join(t.TempDir(), "none.sock"), "status", time.Second); err == nil {
		t.Error("no agent: no error")
	}
}
