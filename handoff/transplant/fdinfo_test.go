package transplant

import (
	"strings"
	"testing"
)

func TestParseEpollFdinfo(t *testing.T) {
	// Captured from /proc/self/fdinfo of an epoll fd on kernel 6.18, plus
	// an nginx-like entry (EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET, a pointer
	// with the instance bit as data).
	real := "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n" +
		"tfd:        3 events: 80002019 data:                3  pos:0 ino:655057 sdev:9\n" +
		"tfd:       12 events: 80002005 data:     7f3a1c0a61e1  pos:0 ino:6551ff sdev:9\n"
	cases := []struct {
		name    string
		in      string
		want    []EpollItem
		wantErr string
	}{
		{"real", real, []EpollItem{
			{FD: 3, Events: 0x80002019, Data: 3, Ino: 0x655057},
			{FD: 12, Events: 0x80002005, Data: 0x7f3a1c0a61e1, Ino: 0x6551ff},
		}, ""},
		{"empty interest list", "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n", nil, ""},
		{"wide fd", "tfd: 123456789 events:       19 data: ffffffffffffffff  pos:0 ino:1 sdev:9\n",
			[]EpollItem{{FD: 123456789, Events: 0x19, Data: ^uint64(0), Ino: 1}}, ""},
		{"no ino", "tfd:        3 events:       19 data:                3  pos:0\n", nil, "missing fields"},
		{"bad events", "tfd:        3 events: zz data: 3 pos:0 ino:1 sdev:9\n", nil, "field events"},
		{"bad fd", "tfd: x events: 19 data: 3 pos:0 ino:1 sdev:9\n", nil, "field tfd"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := ParseEpollFdinfo([]byte(c.in))
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("err %v, want %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(c.want) {
				t.Fatalf("got %+v, want %+v", got, c.want)
			}
			for i := range got {
				if got[i] != c.want[i] {
					t.Errorf("item %d: %+v, want %+v", i, got[i], c.want[i])
				}
			}
		})
	}
	items, _ := ParseEpollFdinfo([]byte(real))
	if it, ok := Find(items, 0x6551ff); !ok || it.FD != 12 {
		t.Errorf("Find: %+v %v", it, ok)
	}
	if _, ok := Find(items, 42); ok {
		t.Error("Find of an absent inode succeeded")
	}
}

func TestReasonStrings(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range Reasons() {
		s := r.String()
		if s == "" || strings.HasPrefix(s, "reason_") || strings.ContainsAny(s, " -ABCDEFGHIJKLMNOPQRSTUVWXYZ") {
			t.Errorf("reason %d: label %q is not a snake_case metric label", r, s)
		}
		if seen[s] {
			t.Errorf("label %q used twice", s)
		}
		seen[s] = true
	}
	if len(seen) != int(ReasonDeferred) {
		t.Errorf("%d labelled reasons, want %d", len(seen), ReasonDeferred)
	}
	if got := Reason(0).String(); got != "reason_0" {
		t.Errorf("zero reason: %q", got)
	}
	err := error(&Error{Reason: ReasonRestore, Server: ServerClosed, Err: errFake})
	if ReasonOf(err) != ReasonRestore || !strings.Contains(err.Error(), "restore (server connection closed)") {
		t.Errorf("error %v, reason %v", err, ReasonOf(err))
	}
	if ReasonOf(errFake) != 0 {
		t.Error("ReasonOf a foreign error")
	}
}

var errFake = fakeErr("bind: address in use")

type fakeErr string

func (e fakeErr) Error() string { return string(e) }
