package agent

import (
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// raiseNoFile lifts RLIMIT_NOFILE as far as this process may: a BE holds
// two sockets per relayed connection and an FE one per connection in
// progress, and running out of descriptors must not be what stops them. As
// root (CAP_SYS_RESOURCE) that is the kernel's fs.nr_open; otherwise the
// hard limit (Go raises the soft limit that far at start already). It
// returns the limit now in force.
func raiseNoFile() uint64 {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0
	}
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil && n > lim.Max {
			want := unix.Rlimit{Cur: n, Max: n}
			if unix.Setrlimit(unix.RLIMIT_NOFILE, &want) == nil {
				return n
			}
		}
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		unix.Setrlimit(unix.RLIMIT_NOFILE, &lim)
	}
	return lim.Cur
}
