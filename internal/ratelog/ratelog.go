// Package ratelog keeps a repeated log line from flooding the log: a
// slog.Handler wrapper that passes the first lines of each message and
// level in an interval and sums up the rest in one line with a count.
//
// The flood it stops is real: a stranger's 85,606 connections to an FE's
// registration port in 10 s wrote one WARN line each, 4.5 MB of log (issue
// 19). The line an operator needs is the first, and how many more.
package ratelog

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Options tune a Handler; zero values take the defaults.
type Options struct {
	// Interval is the window a message's repeats are counted in; default
	// 10 s.
	Interval time.Duration
	// Burst is how many lines of one message and level pass in a window
	// before the rest are counted; default 1.
	Burst int
	// PassBelow, if set, is a level below which records always pass; nil
	// limits every record.
	PassBelow slog.Leveler
	// MaxKeys bounds the messages tracked at once; a record of a new
	// message past it passes unlimited. Default 1024: messages are the
	// program's constant strings, so this is never reached in practice.
	MaxKeys int
}

// RepeatedKey is the attribute of a summary line: how many lines of its
// message and level were left out since the last line of it.
const RepeatedKey = "repeated"

// Handler limits repeated records, then hands them to the inner handler.
// A message's first Burst records in an Interval pass; the others are
// counted, and when the interval ends the last of them is written once
// with repeated=N (N counted). While the repeats go on, each later interval
// gives that one summary line; an interval without a repeat forgets the
// message. Records are keyed by level and message only, so the
// per-connection attributes of a flood (a peer's port) do not defeat it.
type Handler struct {
	inner slog.Handler
	l     *limiter
}

type key struct {
	level slog.Level
	msg   string
}

type window struct {
	passed, dropped int
	// last is the last record left out and h the handler it came to, so
	// that the summary keeps its logger's attributes.
	last slog.Record
	h    slog.Handler
}

type limiter struct {
	opt  Options
	mu   sync.Mutex
	keys map[key]*window
}

// New wraps inner.
func New(inner slog.Handler, opt Options) *Handler {
	if opt.Interval <= 0 {
		opt.Interval = 10 * time.Second
	}
	if opt.Burst <= 0 {
		opt.Burst = 1
	}
	if opt.MaxKeys <= 0 {
		opt.MaxKeys = 1024
	}
	return &Handler{inner: inner, l: &limiter{opt: opt, keys: map[key]*window{}}}
}

// Enabled implements slog.Handler.
func (h *Handler) Enabled(ctx context.Context, l slog.Level) bool { return h.inner.Enabled(ctx, l) }

// WithAttrs implements slog.Handler; the new handler shares the counts.
func (h *Handler) WithAttrs(as []slog.Attr) slog.Handler {
	return &Handler{inner: h.inner.WithAttrs(as), l: h.l}
}

// WithGroup implements slog.Handler; the new handler shares the counts.
func (h *Handler) WithGroup(name string) slog.Handler {
	return &Handler{inner: h.inner.WithGroup(name), l: h.l}
}

// Handle implements slog.Handler.
func (h *Handler) Handle(ctx context.Context, r slog.Record) error {
	l := h.l
	if l.opt.PassBelow != nil && r.Level < l.opt.PassBelow.Level() {
		return h.inner.Handle(ctx, r)
	}
	k := key{r.Level, r.Message}
	l.mu.Lock()
	w := l.keys[k]
	if w == nil {
		if len(l.keys) >= l.opt.MaxKeys {
			l.mu.Unlock()
			return h.inner.Handle(ctx, r)
		}
		w = &window{}
		l.keys[k] = w
		time.AfterFunc(l.opt.Interval, func() { l.flush(k) })
	}
	if w.passed < l.opt.Burst {
		w.passed++
		l.mu.Unlock()
		return h.inner.Handle(ctx, r)
	}
	w.dropped++
	w.last, w.h = r.Clone(), h.inner
	l.mu.Unlock()
	return nil
}

// flush ends k's window: its summary line, if records were left out, and a
// new window that counts from the start; else k is forgotten.
func (l *limiter) flush(k key) {
	l.mu.Lock()
	w := l.keys[k]
	if w.dropped == 0 {
		delete(l.keys, k)
		l.mu.Unlock()
		return
	}
	r, h := w.last, w.h
	r.AddAttrs(slog.Int(RepeatedKey, w.dropped))
	// The repeats are still coming: the next window's lines are counted
	// from its first.
	w.passed, w.dropped, w.last, w.h = l.opt.Burst, 0, slog.Record{}, nil
	time.AfterFunc(l.opt.Interval, func() { l.flush(k) })
	l.mu.Unlock()
	// Nowhere to report a failed write from a timer; the next line will
	// meet the same error in its caller.
	_ = h.Handle(context.Background(), r)
}
