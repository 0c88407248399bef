package transplant

import (
	"fmt"
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

// epollCtlAs registers the socket under fd number n and leaves n as it
// was: in the surgery thread's table n may be one of the Go runtime's own
// fds, which the runtime may use from that thread (a GC on it once failed
// epoll_wait on fd 4 with the server's socket there, and the agent died).
func TestEpollCtlAsPutsBack(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sp[0])
	defer unix.Close(sp[1])
	ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(ep)
	ino := func(fd int) uint64 {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			t.Fatal(err)
		}
		return st.Ino
	}
	n, before, sockIno := p[0], ino(p[0]), ino(sp[0])
	ev := &unix.EpollEvent{Events: unix.EPOLLIN, Fd: 7}
	if err := epollCtlAs(ep, unix.EPOLL_CTL_ADD, n, sp[0], ev); err != nil {
		t.Fatal(err)
	}
	if got := ino(n); got != before {
		t.Errorf("fd %d is inode %d after the call, was %d", n, got, before)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", ep))
	if err != nil {
		t.Fatal(err)
	}
	items, err := ParseEpollFdinfo(b)
	if err != nil {
		t.Fatal(err)
	}
	if it, ok := Find(items, sockIno); !ok || it.FD != n {
		t.Errorf("epoll entries %+v; want the socket (inode %d) under fd %d", items, sockIno, n)
	}
	if err := epollCtlAs(ep, unix.EPOLL_CTL_DEL, n, sp[0], nil); err != nil {
		t.Errorf("delete under the same number: %v", err)
	}
	if got := ino(n); got != before {
		t.Errorf("fd %d is inode %d after the delete, was %d", n, got, before)
	}
}
