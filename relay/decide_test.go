package relay

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"

	"tcpha/phttp"
)

// The pure decisions of a session's jobs, one table each: what goes
// upstream and back (rewrite.go), what follows a response, which request
// may be sent again (choice.go), how a refused connection ends (head.go),
// and the plan (exchange.go).

func parseRequest(t *testing.T, raw string) *phttp.Head {
	t.Helper()
	h, err := phttp.ParseRequest([]byte(raw))
	if err != nil {
		t.Fatalf("%q: %v", raw, err)
	}
	return h
}

func joined(b net.Buffers) string {
	var sb strings.Builder
	for _, p := range b {
		sb.Write(p)
	}
	return sb.String()
}

func TestRequestOut(t *testing.T) {
	client := netip.MustParseAddr("10.0.0.10")
	for _, tc := range []struct {
		name, head, want string
		upKeep           bool
		forFor           netip.Addr
	}{
		{"keep-alive: as is", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", true, netip.Addr{}},
		{"Connection: close is hop-by-hop: dropped, the upstream connection kept",
			"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAccept: */*\r\n\r\n",
			"GET / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n", true, netip.Addr{}},
		{"HTTP/1.0 without keep-alive: as is, not kept", "GET / HTTP/1.0\r\n\r\n", "GET / HTTP/1.0\r\n\r\n", false, netip.Addr{}},
		{"HTTP/1.0 keep-alive", "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true, netip.Addr{}},
		{"empty lines before the request line left out", "\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", true, netip.Addr{}},
		{"an upgrade takes the upstream connection along",
			"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
			"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n", false, netip.Addr{}},
		{"forwardedfor: a new header before the blank line", "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
			"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.10\r\n\r\n", true, client},
		{"forwardedfor: appended to the last X-Forwarded-For",
			"GET / HTTP/1.1\r\nx-forwarded-for: 1.1.1.1\r\nHost: x\r\nX-Forwarded-For: 2.2.2.2  \r\n\r\n",
			"GET / HTTP/1.1\r\nx-forwarded-for: 1.1.1.1\r\nHost: x\r\nX-Forwarded-For: 2.2.2.2, 10.0.0.10  \r\n\r\n", true, client},
		{"forwardedfor with Connection: close dropped and bare LF",
			"GET / HTTP/1.1\nConnection: close\nHost: x\n\n",
			"GET / HTTP/1.1\nHost: x\nX-Forwarded-For: 10.0.0.10\r\n\n", true, client},
		{"forwardedfor after empty lines", "\r\nGET / HTTP/1.1\r\nX-Forwarded-For: 3.3.3.3\r\n\r\n",
			"GET / HTTP/1.1\r\nX-Forwarded-For: 3.3.3.3, 10.0.0.10\r\n\r\n", true, client},
	} {
		h := parseRequest(t, tc.head)
		out, upKeep := requestOut([]byte(tc.head)[:h.Len], h, tc.forFor)
		if got := joined(out); got != tc.want || upKeep != tc.upKeep {
			t.Errorf("%s: %q keep=%v, want %q keep=%v", tc.name, got, upKeep, tc.want, tc.upKeep)
		}
	}
}

func parseResponse(t *testing.T, raw, method string) *phttp.Head {
	t.Helper()
	h, err := phttp.ParseResponse([]byte(raw), method)
	if err != nil {
		t.Fatalf("%q: %v", raw, err)
	}
	return h
}

func TestResponseHeadAndAfter(t *testing.T) {
	const (
		plain   = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
		keep    = "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n"
		bareLF  = "HTTP/1.1 200 OK\nContent-Length: 2\n\n"
		closing = "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n"
		eof     = "HTTP/1.1 200 OK\r\n\r\n"
		chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
		tunnel  = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
	)
	for _, tc := range []struct {
		name, head         string
		clientKeep, upKeep bool
		want               string
		more, reuse        bool
	}{
		{"both keep", plain, true, true, plain, true, true},
		{"the client closes: the head says so", plain, false, true,
			"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n", false, true},
		{"keep-alive becomes close", keep, false, true,
			"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", false, true},
		{"bare LF head", bareLF, false, true, "HTTP/1.1 200 OK\nContent-Length: 2\nConnection: close\r\n\n", false, true},
		{"the upstream connection not reusable", plain, true, false, plain, true, false},
		{"the web server closes: both end", closing, true, true, closing, false, false},
		{"a body to the server's close: both end", eof, true, true, eof, false, false},
		{"chunked", chunked, true, true, chunked, true, true},
		{"a tunnel: as is, and both end with it", tunnel, false, false, tunnel, false, false},
	} {
		rh := parseResponse(t, tc.head, "GET")
		got := joined(responseHead([]byte(tc.head)[:rh.Len], rh, tc.clientKeep))
		after := afterResponse(tc.clientKeep, tc.upKeep, rh)
		if got != tc.want || after.more != tc.more || after.reuse != tc.reuse {
			t.Errorf("%s: %q %+v, want %q more=%v reuse=%v", tc.name, got, after, tc.want, tc.more, tc.reuse)
		}
	}
}

func TestMayRetry(t *testing.T) {
	for _, tc := range []struct {
		method       string
		whole, idled bool
		want         bool
	}{
		{"GET", true, true, true},
		{"PUT", true, true, true},
		{"DELETE", true, true, true},
		{"HEAD", true, true, true},
		{"POST", true, true, false},  // not idempotent
		{"PATCH", true, true, false}, // not idempotent
		{"GET", false, true, false},  // body still to come from the client
		{"GET", true, false, false},  // a new connection that failed: the server's answer
	} {
		if got := mayRetry(tc.method, tc.whole, tc.idled); got != tc.want {
			t.Errorf("mayRetry(%s, whole %v, idled %v) = %v", tc.method, tc.whole, tc.idled, got)
		}
	}
}

func TestRefusal(t *testing.T) {
	for _, tc := range []struct {
		name     string
		err      error
		partial  bool
		status   int
		graceful bool
	}{
		{"the client left", errClientGone, false, 0, false},
		{"EOF", io.EOF, true, 0, false},
		{"idle too long between requests", os.ErrDeadlineExceeded, false, 0, true},
		{"a head too slow", os.ErrDeadlineExceeded, true, 408, true},
		{"a malformed head", fmt.Errorf("x: %w", phttp.ErrMalformed), true, 400, true},
		{"ambiguous framing", phttp.ErrFraming, true, 400, true},
		{"a head too large", phttp.ErrHeaderTooLarge, true, 431, true},
		{"the connection failed", syscall.EPIPE, true, 0, false},
	} {
		if status, graceful := refusal(tc.err, tc.partial); status != tc.status || graceful != tc.graceful {
			t.Errorf("%s: status %d graceful %v, want %d %v", tc.name, status, graceful, tc.status, tc.graceful)
		}
	}
}

func TestPlanFor(t *testing.T) {
	other := &Pool{}
	route := func(host, path string) Rules {
		if path == "/other" || host == "other.example" {
			return Rules{Usable: []*Pool{other}}
		}
		return Rules{Here: true}
	}
	for _, tc := range []struct {
		name  string
		later bool
		route func(string, string) Rules
		host  string
		path  string
		want  Plan
	}{
		{"the first request is this BE's whatever the rules say", false, route, "", "/other", here},
		{"no rules: every request here", true, nil, "", "/other", here},
		{"a later request by the rules", true, route, "", "/other", Plan{Move: true, Pools: []*Pool{other}}},
		{"a later request by its host", true, route, "other.example", "/", Plan{Move: true, Pools: []*Pool{other}}},
		{"a later request of this BE's", true, route, "", "/", here},
	} {
		got := planFor(tc.later, tc.route, tc.host, tc.path)
		if got.Here != tc.want.Here || got.Move != tc.want.Move || len(got.Pools) != len(tc.want.Pools) ||
			len(got.Pools) > 0 && got.Pools[0] != tc.want.Pools[0] {
			t.Errorf("%s: %+v, want %+v", tc.name, got, tc.want)
		}
	}
}

// peekHead leaves the response head in the buffer, reading only until it
// is whole, and bounds it.
func TestPeekHead(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		status   int
		err      error
	}{
		{"a head and its body", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, nil},
		{"interim first", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", 100, nil},
		{"cut short", "HTTP/1.1 200 OK\r\nContent-", 0, io.EOF},
		{"nothing", "", 0, io.EOF},
		{"too large", "HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", maxResponseHead) + "\r\n\r\n", 0, phttp.ErrMalformed},
	} {
		br := bufio.NewReaderSize(strings.NewReader(tc.in), 16<<10)
		h, err := peekHead(br, "GET")
		switch {
		case !errors.Is(err, tc.err):
			t.Errorf("%s: %v, want %v", tc.name, err, tc.err)
		case err == nil && (h.Status != tc.status || br.Buffered() < h.Len):
			t.Errorf("%s: status %d, %d bytes buffered for a %d-byte head", tc.name, h.Status, br.Buffered(), h.Len)
		}
	}
}
