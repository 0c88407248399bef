package transplant

import (
	"bufio"
	"bytes"
	"fmt"
	"strconv"
)

// EpollItem is one entry of an epoll instance's interest list, as
// /proc/<pid>/fdinfo/<epoll fd> prints it (fs/eventpoll.c,
// ep_show_fdinfo): "tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx
// sdev:%x". The key of an entry is the pair (file, fd number in the process
// that added it): to delete and re-add it, a process must hold the same
// file under the same number FD.
type EpollItem struct {
	FD     int
	Events uint32
	Data   uint64
	Ino    uint64
}

// ParseEpollFdinfo returns the interest list in an epoll fd's fdinfo.
// Lines other than tfd lines (pos, flags, mnt_id, ino of the epoll itself)
// are skipped; a malformed tfd line is an error.
func ParseEpollFdinfo(b []byte) ([]EpollItem, error) {
	var items []EpollItem
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Bytes()
		if !bytes.HasPrefix(line, []byte("tfd:")) {
			continue
		}
		it, err := parseTfd(line)
		if err != nil {
			return nil, fmt.Errorf("epoll fdinfo line %q: %w", line, err)
		}
		items = append(items, it)
	}
	return items, sc.Err()
}

// parseTfd reads the fields of one tfd line by name: "tfd:" and
// "events:"/"data:" are followed by a space and a padded value, "ino:" is
// glued to its value.
func parseTfd(line []byte) (EpollItem, error) {
	var it EpollItem
	var seen int
	f := bytes.Fields(line)
	for i := 0; i < len(f); i++ {
		key, val := f[i], []byte(nil)
		next := 0 // 1 when the value is the next field
		if k, v, ok := bytes.Cut(key, []byte(":")); ok && len(v) > 0 {
			key, val = k, v
		} else {
			key = bytes.TrimSuffix(key, []byte(":"))
			if i+1 < len(f) {
				val, next = f[i+1], 1
			}
		}
		var err error
		switch string(key) {
		case "tfd":
			var n int64
			n, err = strconv.ParseInt(string(val), 10, 32)
			it.FD = int(n)
			seen |= 1
			i += next
		case "events":
			var n uint64
			n, err = strconv.ParseUint(string(val), 16, 32)
			it.Events = uint32(n)
			seen |= 2
			i += next
		case "data":
			it.Data, err = strconv.ParseUint(string(val), 16, 64)
			seen |= 4
			i += next
		case "ino":
			it.Ino, err = strconv.ParseUint(string(val), 16, 64)
			seen |= 8
			i += next
		}
		if err != nil {
			return EpollItem{}, fmt.Errorf("field %s: %w", key, err)
		}
	}
	if seen != 15 {
		return EpollItem{}, fmt.Errorf("missing fields (have mask %b of tfd, events, data, ino)", seen)
	}
	return it, nil
}

// Find returns the entry for the file with inode ino.
func Find(items []EpollItem, ino uint64) (EpollItem, bool) {
	for _, it := range items {
		if it.Ino == ino {
			return it, true
		}
	}
	return EpollItem{}, false
}
