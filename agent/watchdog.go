package agent

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"tcpha/config"
)

// watchdog feeds systemd's watchdog (WatchdogSec) from the agent's main
// loop, and only after the roles' loops that can hang have answered: a
// ticker of its own would go on feeding while the agent no longer hands
// off a connection. A check runs beside the main loop, so that a check
// that hangs leaves the loop free to stop or reload; one that has not
// answered is not started again, and nothing is fed meanwhile.
type watchdog struct {
	every  time.Duration // a third of WatchdogSec: a missed feed or two is not a restart
	alive  func(context.Context) error
	notify func(string)
	log    *slog.Logger
	// checked gets each check's verdict; checking says one is under way.
	checked  chan error
	checking bool
}

func newWatchdog(period time.Duration, alive func(context.Context) error, notify func(string), log *slog.Logger) *watchdog {
	return &watchdog{every: period / 3, alive: alive, notify: notify, log: log, checked: make(chan error, 1)}
}

// ticks returns the main loop's ticker channel, nil (never) when the
// watchdog is off, and the ticker's stop.
func (w *watchdog) ticks() (<-chan time.Time, func()) {
	if w == nil || w.every <= 0 || w.notify == nil {
		return nil, func() {}
	}
	t := time.NewTicker(w.every)
	return t.C, t.Stop
}

// verdicts is where the main loop hears a check's verdict (nil: never).
func (w *watchdog) verdicts() <-chan error {
	if w == nil {
		return nil
	}
	return w.checked
}

// tick starts a check unless one is under way; it bounds the check by a
// tick, so that a slow answer counts as none.
func (w *watchdog) tick(ctx context.Context) {
	if w.checking {
		w.log.Error("watchdog not fed: the last check has not answered", "op", "watchdog")
		return
	}
	w.checking = true
	go func() {
		cctx, cancel := context.WithTimeout(ctx, w.every)
		defer cancel()
		w.checked <- w.alive(cctx)
	}()
}

// verdict feeds the watchdog when the check passed.
func (w *watchdog) verdict(err error) {
	w.checking = false
	if err != nil {
		w.log.Error("watchdog not fed", "op", "watchdog", "err", err)
		return
	}
	w.notify("WATCHDOG=1")
}

// alive asks each role whether its loops that can hang still turn.
func (r *runner) alive(ctx context.Context) error {
	if r.f != nil {
		if err := r.f.Alive(ctx); err != nil {
			return fmt.Errorf("fe: %w", err)
		}
	}
	if r.b != nil {
		if err := r.b.Alive(); err != nil {
			return fmt.Errorf("be: %w", err)
		}
	}
	return nil
}

// stopMargin is what a stop takes beyond the drain: resetting the
// connections left (2 s at most), removing the tables and the VIP, and
// room for a loaded host.
const stopMargin = 20 * time.Second

// StopTime bounds how long the agent takes to stop after SIGTERM: the
// longer of the roles' drains (they drain at once), and the margin. The
// agent tells systemd (EXTEND_TIMEOUT_USEC), so that a drain longer than
// the unit's TimeoutStopSec is not cut by a SIGKILL that leaves the
// tables behind. A reload does not change the drain a stop uses.
func StopTime(cfg *config.Config) time.Duration {
	var drain time.Duration
	if cfg.FE != nil {
		drain = max(drain, cfg.FE.Drain)
	}
	if cfg.BE != nil {
		drain = max(drain, cfg.BE.Drain)
	}
	return drain + stopMargin
}
