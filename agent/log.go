package agent

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"tcpha/config"
	"tcpha/internal/ratelog"
)

// Logger is the agent's logger and what an operator changes while it runs:
// its level (tcphactl loglevel, a reload) and its file (reopened on SIGHUP,
// after logrotate moved it).
type Logger struct {
	*slog.Logger
	level *slog.LevelVar
	file  *reopener // nil when logging to stderr
}

// Level maps the seed's dbglevel, 0-6, to a slog level: 0-1 errors, 2-3
// warnings, 4 info, 5-6 debug.
func Level(n int) slog.Level {
	switch {
	case n <= 1:
		return slog.LevelError
	case n <= 3:
		return slog.LevelWarn
	case n == 4:
		return slog.LevelInfo
	}
	return slog.LevelDebug
}

// NewLogger returns the agent's logger: to g's logfile, or to stderr, where
// under systemd (journal) each line starts with its syslog priority, as
// sd-daemon(3) describes, so that journalctl -p works. Repeats are limited
// (logLimits).
func NewLogger(g config.Global, stderr io.Writer, journal bool) (*Logger, error) {
	l := &Logger{level: new(slog.LevelVar)}
	l.level.Set(Level(g.LogLevel))
	opts := &slog.HandlerOptions{Level: l.level}
	var h slog.Handler
	switch {
	case g.LogFile != "":
		f, err := openLog(g.LogFile)
		if err != nil {
			return nil, err
		}
		l.file = &reopener{path: g.LogFile, f: f}
		h = slog.NewTextHandler(l.file, opts)
	case journal:
		pw := &prioWriter{w: stderr}
		h = &prioHandler{inner: slog.NewTextHandler(pw, opts), w: pw}
	default:
		h = slog.NewTextHandler(stderr, opts)
	}
	l.Logger = slog.New(ratelog.New(h, logLimits))
	return l, nil
}

// logLimits bound how often one message is written: its first 10 lines in
// 10 s, then one line per 10 s with repeated=N, so that a stranger's flood
// of connections cannot fill the disk with refusals (issue 19: 4.5 MB in
// 10 s). Debug lines, which an operator turns on to see every connection,
// are not limited.
var logLimits = ratelog.Options{Interval: 10 * time.Second, Burst: 10, PassBelow: slog.LevelInfo}

// SetLevel sets the level by the seed's dbglevel, 0-6.
func (l *Logger) SetLevel(n int) { l.level.Set(Level(n)) }

// Reopen reopens the log file, if there is one.
func (l *Logger) Reopen() error {
	if l.file == nil {
		return nil
	}
	return l.file.reopen()
}

// Close closes the log file, if there is one.
func (l *Logger) Close() error {
	if l.file == nil {
		return nil
	}
	return l.file.close()
}

func openLog(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open logfile: %w", err)
	}
	return f, nil
}

// reopener is a log file that can be reopened under its writers.
type reopener struct {
	mu   sync.Mutex
	path string
	f    *os.File
}

func (r *reopener) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.f.Write(p)
}

func (r *reopener) reopen() error {
	f, err := openLog(r.path)
	if err != nil {
		return err
	}
	r.mu.Lock()
	old := r.f
	r.f = f
	r.mu.Unlock()
	return old.Close()
}

func (r *reopener) close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.f.Close()
}

// prioHandler puts each record's syslog priority in front of its line.
type prioHandler struct {
	inner slog.Handler
	w     *prioWriter
}

type prioWriter struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
}

func (p *prioWriter) Write(b []byte) (int, error) {
	// Under the handler's lock: one record, one line, one write.
	if _, err := io.WriteString(p.w, p.prefix); err != nil {
		return 0, err
	}
	return p.w.Write(b)
}

func (h *prioHandler) Enabled(ctx context.Context, l slog.Level) bool { return h.inner.Enabled(ctx, l) }

func (h *prioHandler) Handle(ctx context.Context, r slog.Record) error {
	h.w.mu.Lock()
	defer h.w.mu.Unlock()
	switch {
	case r.Level >= slog.LevelError:
		h.w.prefix = "<3>"
	case r.Level >= slog.LevelWarn:
		h.w.prefix = "<4>"
	case r.Level >= slog.LevelInfo:
		h.w.prefix = "<6>"
	default:
		h.w.prefix = "<7>"
	}
	return h.inner.Handle(ctx, r)
}

func (h *prioHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &prioHandler{inner: h.inner.WithAttrs(as), w: h.w}
}

func (h *prioHandler) WithGroup(name string) slog.Handler {
	return &prioHandler{inner: h.inner.WithGroup(name), w: h.w}
}

// logWarnings logs what the config holds that is legal but probably not
// meant (config.Config.Warnings), each as one line.
func logWarnings(log *slog.Logger, op string, cfg *config.Config) {
	for _, w := range cfg.Warnings {
		log.Warn("config warning", "op", op, "file", cfg.File, "warning", w)
	}
}
