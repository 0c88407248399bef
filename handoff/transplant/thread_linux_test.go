package transplant

import (
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// The surgery's private fd table never lands on the main thread: the
// runtime does not end a main thread whose goroutine exits locked, so its
// table would stay private and stale, and /proc/self/fd (the main thread's)
// would stop showing the fds the process opens later. Without the guard
// the scheduler picked the main thread within a few calls.
func TestPrivateFDTableSparesMainThread(t *testing.T) {
	for i := range 300 {
		var tid int
		var shared bool
		f, err := os.Open("/dev/null")
		if err != nil {
			t.Fatal(err)
		}
		onPrivateFDTable(func() *Error {
			tid = unix.Gettid()
			// The copy holds f; after closing it here the shared table
			// must still have it.
			unix.Close(int(f.Fd()))
			return nil
		})
		_, err = os.Readlink("/proc/self/fd/" + strconv.Itoa(int(f.Fd())))
		shared = err == nil
		f.Close()
		if tid == unix.Getpid() {
			t.Fatalf("call %d ran on the main thread", i)
		}
		if !shared {
			t.Fatalf("call %d: the main thread's table lost an fd the process holds", i)
		}
		g, err := os.Open("/dev/null")
		if err != nil {
			t.Fatal(err)
		}
		_, err = os.Readlink("/proc/self/fd/" + strconv.Itoa(int(g.Fd())))
		g.Close()
		if err != nil {
			t.Fatalf("call %d: /proc/self/fd misses a new fd: the main thread's table is private", i)
		}
	}
}
