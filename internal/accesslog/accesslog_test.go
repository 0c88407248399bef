package accesslog

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 12, 3, 14, 5, 6, 789_654_321, time.FixedZone("CET", 3600))

func TestAppendLine(t *testing.T) {
	client := netip.MustParseAddrPort("10.0.0.1:40000")
	for _, tc := range []struct {
		name string
		e    Entry
		want string
	}{
		{"BE served here",
			Entry{Time: t0, Role: BE, Client: client, Host: "www.example", Method: "GET", Target: "/index.html?a=1",
				Status: 200, Bytes: 1234, Served: Here, BE: "10.0.0.11", Total: 2345 * time.Microsecond},
			`2026-12-03T13:05:06.789Z be 10.0.0.1:40000 www.example GET "/index.html?a=1" 200 1234 here 10.0.0.11 - 2.345` + "\n"},
		{"BE moved",
			Entry{Time: t0, Role: BE, Client: client, Method: "GET", Target: "/b", Served: Move,
				Latency: 812 * time.Microsecond, Total: time.Millisecond},
			`2026-12-03T13:05:06.789Z be 10.0.0.1:40000 - GET "/b" - 0 move - 0.812 1.000` + "\n"},
		{"FE handoff",
			Entry{Time: t0, Role: FE, Client: client, Host: "a.example", Method: "POST", Target: "/up", Served: Handoff,
				BE: "10.0.0.12", Latency: 1500 * time.Microsecond, Total: 61 * time.Second},
			`2026-12-03T13:05:06.789Z fe 10.0.0.1:40000 a.example POST "/up" - 0 handoff 10.0.0.12 1.500 61000.000` + "\n"},
		{"FE refused, nothing known",
			Entry{Time: t0, Role: FE, Status: 400, Bytes: 97, Served: Answered},
			`2026-12-03T13:05:06.789Z fe - - - "" 400 97 answered - - -` + "\n"},
		{"hostile target, host and method",
			Entry{Time: t0, Role: BE, Client: client, Host: "a b", Method: "G\"T", Target: "/x\" 200 1 here\n2026 \\ \x00\x7f\xff",
				Status: 404, Served: Here},
			`2026-12-03T13:05:06.789Z be 10.0.0.1:40000 a\x20b G\x22T "/x\x22\x20200\x201\x20here\x0a2026\x20\x5c\x20\x00\x7f\xff" 404 0 here - - -` + "\n"},
		{"a value that is a dash",
			Entry{Time: t0, Role: BE, Host: "-", Method: "-", Target: "-", Served: Here},
			`2026-12-03T13:05:06.789Z be - \x2d \x2d "-" - 0 here - - -` + "\n"},
		{"IPv6 client",
			Entry{Time: t0, Role: BE, Client: netip.MustParseAddrPort("[2001:db8::1]:443"), Served: Here, Total: 1},
			`2026-12-03T13:05:06.789Z be [2001:db8::1]:443 - - "" - 0 here - - 0.000` + "\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := string(AppendLine(nil, tc.e))
			if got != tc.want {
				t.Errorf("got  %q\nwant %q", got, tc.want)
			}
			if f := Split(got); len(f) != Fields {
				t.Errorf("%d fields: %q", len(f), f)
			}
		})
	}
}

// TestRoundTrip: the text fields read back as what was written.
func TestRoundTrip(t *testing.T) {
	e := Entry{Time: t0, Role: BE, Host: "h\x01-", Method: "-", Target: "/a b\"\\c\xc3\xa9", Served: Forward, BE: "10.0.0.13"}
	f := Split(string(AppendLine(nil, e)))
	for i, want := range map[int]string{3: e.Host, 4: e.Method, 5: e.Target, 8: string(e.Served), 9: e.BE, 6: ""} {
		if got := Unescape(f[i]); got != want {
			t.Errorf("field %d = %q, unescaped %q, want %q", i, f[i], got, want)
		}
	}
}

func FuzzAppendLine(f *testing.F) {
	f.Add("www.example", "GET", "/index.html", "10.0.0.11", 200, int64(10), int64(1000))
	f.Add("", "", "", "", 0, int64(-1), int64(-5))
	f.Add("-", "a b", "/\"\n\\x20", "-", 101, int64(1<<40), int64(1<<62))
	f.Fuzz(func(t *testing.T, host, method, target, be string, status int, bytes, d int64) {
		e := Entry{Time: time.Unix(0, d), Role: BE, Client: netip.MustParseAddrPort("10.0.0.1:1"),
			Host: host, Method: method, Target: target, Status: status, Bytes: bytes,
			Served: Here, BE: be, Latency: time.Duration(d), Total: time.Duration(-d)}
		line := string(AppendLine(nil, e))
		if strings.Count(line, "\n") != 1 || !strings.HasSuffix(line, "\n") {
			t.Fatalf("not one line: %q", line)
		}
		for i := 0; i < len(line)-1; i++ {
			if c := line[i]; c < ' ' || c >= 0x7f {
				t.Fatalf("raw byte %#x in %q", c, line)
			}
		}
		fields := Split(line)
		if len(fields) != Fields {
			t.Fatalf("%d fields in %q", len(fields), line)
		}
		for i, want := range map[int]string{3: host, 4: method, 5: target, 9: be} {
			if got := Unescape(fields[i]); got != want {
				t.Fatalf("field %d %q reads back as %q, want %q", i, fields[i], got, want)
			}
		}
		if q := fields[5]; len(q) < 2 || q[0] != '"' || q[len(q)-1] != '"' || strings.Contains(q[1:len(q)-1], `"`) {
			t.Fatalf("target field %q", q)
		}
	})
}
