package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"tcpha/config"
)

// notes records what would go to systemd.
type notes struct {
	mu  sync.Mutex
	got []string
}

func (n *notes) notify(s string) { n.mu.Lock(); n.got = append(n.got, s); n.mu.Unlock() }
func (n *notes) count(s string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, g := range n.got {
		if g == s {
			c++
		}
	}
	return c
}

// runLoop is the agent's main loop as far as the watchdog goes.
func runLoop(ctx context.Context, wd *watchdog) {
	ticks, stop := wd.ticks()
	defer stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticks:
			wd.tick(ctx)
		case err := <-wd.verdicts():
			wd.verdict(err)
		}
	}
}

// The watchdog is fed while the roles answer, and not while a check
// fails or hangs: a ticker of its own fed it whatever the agent did. A
// hung check is not started again on every tick.
func TestWatchdogFedOnlyWhileAlive(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	// hang ends the hung check once the test has looked, so that the
	// bubble can end.
	var hang chan struct{}
	for name, tc := range map[string]struct {
		alive func(ctx context.Context, calls int) error
		fed   bool
	}{
		"answers": {func(context.Context, int) error { return nil }, true},
		"fails":   {func(context.Context, int) error { return errors.New("the flow owner does not answer") }, false},
		// A check that honours its deadline answers "too late".
		"slow": {func(ctx context.Context, _ int) error { <-ctx.Done(); return ctx.Err() }, false},
		// One that never returns.
		"hangs": {func(context.Context, int) error { <-hang; return nil }, false},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				hang = make(chan struct{})
				var n notes
				var mu sync.Mutex
				calls := 0
				alive := func(ctx context.Context) error {
					mu.Lock()
					calls++
					c := calls
					mu.Unlock()
					return tc.alive(ctx, c)
				}
				ctx, cancel := context.WithCancel(t.Context())
				wd := newWatchdog(30*time.Second, alive, n.notify, log)
				go runLoop(ctx, wd)
				time.Sleep(95 * time.Second) // nine ticks
				synctest.Wait()
				fed := n.count("WATCHDOG=1")
				if tc.fed && fed < 8 {
					t.Errorf("fed %d times in 95 s, want one per 10 s tick", fed)
				}
				if !tc.fed && fed > 0 {
					t.Errorf("fed %d times, want none", fed)
				}
				mu.Lock()
				if name == "hangs" && calls != 1 {
					t.Errorf("%d checks started, want one while it hangs", calls)
				}
				mu.Unlock()
				cancel()
				close(hang)
			})
		})
	}
}

// Off without WatchdogSec.
func TestWatchdogOff(t *testing.T) {
	for _, wd := range []*watchdog{nil, newWatchdog(0, nil, func(string) {}, nil), newWatchdog(time.Second, nil, nil, nil)} {
		if c, _ := wd.ticks(); c != nil {
			t.Errorf("%+v ticks", wd)
		}
	}
}

// A stop is given the longer drain and the margin (EXTEND_TIMEOUT_USEC).
func TestStopTime(t *testing.T) {
	for _, tc := range []struct {
		fe, be time.Duration
		want   time.Duration
	}{{20 * time.Second, 0, 40 * time.Second}, {0, 90 * time.Second, 110 * time.Second},
		{20 * time.Second, 60 * time.Second, 80 * time.Second}} {
		cfg := &config.Config{}
		if tc.fe > 0 {
			cfg.FE = &config.FE{Drain: tc.fe}
		}
		if tc.be > 0 {
			cfg.BE = &config.BE{Drain: tc.be}
		}
		if got := StopTime(cfg); got != tc.want {
			t.Errorf("drain fe %v be %v: %v, want %v", tc.fe, tc.be, got, tc.want)
		}
	}
}
