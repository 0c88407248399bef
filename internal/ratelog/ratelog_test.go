package ratelog

import (
	"bytes"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// buffer is a goroutine-safe log destination (summaries come from timers).
type buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *buffer) lines() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Split(strings.TrimSpace(b.b.String()), "\n")
}

func newLogger(buf *buffer, opt Options) *slog.Logger {
	// No time in the lines: they are compared whole.
	th := slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}})
	return slog.New(New(th, opt))
}

// A flood of one message gives its first line, then one line per interval
// with how many were left out; other messages and levels are counted apart;
// after a quiet interval the message is new again.
func TestFloodSummedUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var buf buffer
		log := newLogger(&buf, Options{Interval: 10 * time.Second})
		// 85,606 strangers in 10 s, as in issue 19, each from its own port;
		// the logger carries its role.
		be := log.With("role", "be")
		for i := range 85606 {
			be.Warn("control session refused", "peer", "10.0.0.2:"+strconv.Itoa(1024+i%60000))
		}
		// Other messages and levels, a moment later each so that their
		// summaries come in a known order.
		time.Sleep(time.Millisecond)
		for i := range 9 {
			log.Info("control sessions up", "n", i)
		}
		time.Sleep(time.Millisecond)
		for range 9 {
			log.Warn("control sessions up")
		}
		time.Sleep(10 * time.Second)
		// More of the flood in the next interval, then quiet.
		for range 1000 {
			be.Warn("control session refused", "peer", "10.0.0.2:1")
		}
		time.Sleep(30 * time.Second)
		be.Warn("control session refused", "peer", "10.0.0.2:2")
		synctest.Wait()
		want := []string{
			`level=WARN msg="control session refused" role=be peer=10.0.0.2:1024`,
			`level=INFO msg="control sessions up" n=0`,
			`level=WARN msg="control sessions up"`,
			`level=WARN msg="control session refused" role=be peer=10.0.0.2:26629 repeated=85605`,
			`level=INFO msg="control sessions up" n=8 repeated=8`,
			`level=WARN msg="control sessions up" repeated=8`,
			`level=WARN msg="control session refused" role=be peer=10.0.0.2:1 repeated=1000`,
			`level=WARN msg="control session refused" role=be peer=10.0.0.2:2`,
		}
		got := buf.lines()
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	})
}

// Burst lets the first few of a message through; PassBelow leaves the
// levels below it alone.
func TestBurstAndPassBelow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var buf buffer
		log := newLogger(&buf, Options{Interval: time.Second, Burst: 3, PassBelow: slog.LevelInfo})
		for i := range 5 {
			log.Info("reloaded", "i", i)
			log.Debug("handoff done", "i", i)
		}
		time.Sleep(1500 * time.Millisecond)
		got := strings.Join(buf.lines(), "\n")
		want := strings.Join([]string{
			`level=INFO msg=reloaded i=0`, `level=DEBUG msg="handoff done" i=0`,
			`level=INFO msg=reloaded i=1`, `level=DEBUG msg="handoff done" i=1`,
			`level=INFO msg=reloaded i=2`, `level=DEBUG msg="handoff done" i=2`,
			`level=DEBUG msg="handoff done" i=3`,
			`level=DEBUG msg="handoff done" i=4`,
			`level=INFO msg=reloaded i=4 repeated=2`,
		}, "\n")
		if got != want {
			t.Errorf("log:\n%s\nwant:\n%s", got, want)
		}
	})
}

// Past MaxKeys, a new message passes unlimited rather than being lost.
func TestMaxKeys(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var buf buffer
		log := newLogger(&buf, Options{MaxKeys: 1})
		for range 3 {
			log.Info("a")
			log.Info("b")
		}
		if got := strings.Join(buf.lines(), " "); got != "level=INFO msg=a level=INFO msg=b level=INFO msg=b level=INFO msg=b" {
			t.Errorf("log: %s", got)
		}
		time.Sleep(11 * time.Second)
	})
}
