// Package admin is the agent's admin socket: one request per connection, a
// line
//
//	[json ]COMMAND [ARGS...]
//
// answered by a status line, `ok` or `error: WHY`, and the output. The
// server parses and checks the request and writes the answer; what a
// command does is its Handler's. The client (Do) is the one tcphactl, the
// test cluster and the tests use. A successor agent's `upgrade` and
// `takeover` lines start the handover protocol (package handover) on the
// same socket instead.
package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// ErrAgentRunning is the answer when an agent already serves the socket.
var ErrAgentRunning = errors.New("another agent is running there")

// Listen opens the admin socket at path. A socket file left by a crashed
// agent is replaced; one an agent answers on is not.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	// A socket file left by a crashed agent is stale only if nobody answers.
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin socket %s: %w", path, ErrAgentRunning)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	os.Chmod(path, 0o600)
	return ln, nil
}

// Request is one admin request, checked against the commands' arities.
type Request struct {
	JSON bool // answer in JSON rather than text
	Cmd  string
	Args []string
}

// ErrUsage lists the commands.
var ErrUsage = errors.New("want status, backends, rates, rules, conns [be=ADDR] [state=STATE] [client=ADDR], " +
	"loglevel N, dtcinterval SECONDS, drain ADDR, enable ADDR, maint ADDR, ready ADDR, kill ADDR, " +
	"weight ADDR N, clear counters or reload, optionally after json")

// arity is each command's least and most number of arguments.
var arity = map[string][2]int{"status": {0, 0}, "backends": {0, 0}, "rates": {0, 0}, "rules": {0, 0},
	"conns": {0, 3}, "reload": {0, 0}, "loglevel": {1, 1}, "dtcinterval": {1, 1}, "drain": {1, 1},
	"enable": {1, 1}, "maint": {1, 1}, "ready": {1, 1}, "kill": {1, 1}, "weight": {2, 2}, "clear": {1, 1}}

// Commands lists the commands and the arguments each needs, so that a
// test can walk every one.
func Commands() map[string]int {
	out := map[string]int{}
	for c, n := range arity {
		out[c] = n[0]
	}
	return out
}

// Parse reads one request line.
func Parse(line string) (Request, error) {
	args := strings.Fields(line)
	var r Request
	if r.JSON = len(args) > 0 && args[0] == "json"; r.JSON {
		args = args[1:]
	}
	if len(args) == 0 {
		return r, ErrUsage
	}
	r.Cmd, r.Args = args[0], args[1:]
	n, ok := arity[r.Cmd]
	if !ok {
		return r, fmt.Errorf("unknown command %q: %w", r.Cmd, ErrUsage)
	}
	switch {
	case n[0] == n[1] && len(r.Args) != n[0]:
		return r, fmt.Errorf("%s takes %d argument(s), got %d", r.Cmd, n[0], len(r.Args))
	case len(r.Args) < n[0] || len(r.Args) > n[1]:
		return r, fmt.Errorf("%s takes %d to %d arguments, got %d", r.Cmd, n[0], n[1], len(r.Args))
	case r.Cmd == "clear" && r.Args[0] != "counters":
		return r, fmt.Errorf("clear %q: want clear counters", r.Args[0])
	}
	if r.Cmd == "conns" {
		if _, err := ParseConnFilter(r.Args); err != nil {
			return r, err
		}
	}
	return r, nil
}

// Handler carries out a checked request: v is the answer for JSON, text
// the one for people.
type Handler func(Request) (v any, text string, err error)

// Server answers the admin socket's requests.
type Server struct {
	Handle Handler
	// Successor takes a connection whose line was `upgrade` (force) or
	// `takeover`; it owns c from then on.
	Successor func(ctx context.Context, c *net.UnixConn, force bool)
	Log       *slog.Logger
}

// Serve answers the requests on ln until ctx ends; then it closes ln.
func (s *Server) Serve(ctx context.Context, ln net.Listener) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				s.Log.Error("admin socket", "op", "admin", "err", err)
			}
			return
		}
		go s.serve(ctx, c)
	}
}

func (s *Server) serve(ctx context.Context, c net.Conn) {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, _ := bufio.NewReader(io.LimitReader(c, 4096)).ReadString('\n')
	if cmd := strings.TrimSpace(line); cmd == "upgrade" || cmd == "takeover" {
		uc, ok := c.(*net.UnixConn)
		if ok && s.Successor != nil {
			// A successor: nothing more comes on the line.
			c.SetDeadline(time.Time{})
			s.Successor(ctx, uc, cmd == "upgrade")
			return
		}
	}
	defer c.Close()
	out, err := s.answer(line)
	if err != nil {
		fmt.Fprintf(c, "error: %v\n", err)
		s.Log.Info("admin command refused", "op", "admin", "command", strings.TrimSpace(line), "err", err)
		return
	}
	io.WriteString(c, "ok\n"+out)
}

// answer runs one request line and returns its output.
func (s *Server) answer(line string) (string, error) {
	req, err := Parse(line)
	if err != nil {
		return "", err
	}
	v, text, err := s.Handle(req)
	if err != nil {
		return "", err
	}
	if req.JSON {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return "", fmt.Errorf("%s: encode the answer: %w", req.Cmd, err)
		}
		return string(b) + "\n", nil
	}
	return text, nil
}

// RefusedError is the agent's refusal of a request, with its reason.
type RefusedError struct{ Why string }

func (e *RefusedError) Error() string { return e.Why }

// Do sends one request line to the agent at the admin socket path and
// returns its output. The agent's refusal is a *RefusedError; any other
// error says the agent could not be asked.
func Do(path, req string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("unix", path, min(timeout, 2*time.Second))
	if err != nil {
		return "", fmt.Errorf("connect to the admin socket: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprintln(c, req); err != nil {
		return "", fmt.Errorf("send %q: %w", req, err)
	}
	br := bufio.NewReader(c)
	status, err := br.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("no answer from the agent: %w", err)
	}
	status = strings.TrimSpace(status)
	if why, failed := strings.CutPrefix(status, "error: "); failed {
		return "", &RefusedError{Why: why}
	}
	if status != "ok" {
		return "", fmt.Errorf("unexpected answer %q", status)
	}
	out, err := io.ReadAll(br)
	if err != nil {
		return "", fmt.Errorf("read the answer: %w", err)
	}
	return string(out), nil
}
