package relay

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"tcpha/internal/accesslog"
)

// countingConn counts the bytes the client reads.
type countingConn struct {
	net.Conn
	n int64
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n += int64(n)
	return n, err
}

// A keep-alive connection's three requests give three access log lines,
// each with its own status and the bytes its response took on the wire.
func TestAccessLogKeepAlive(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	var rec accesslog.Recorder
	r.cfg.Access = rec.Log
	c := connect(t, r)
	cc := &countingConn{Conn: c}
	br := bufio.NewReader(cc)
	var sizes []int64
	for _, path := range []string{"/small", "/nocontent", "/big"} {
		before := cc.n - int64(br.Buffered())
		resp := get(t, c, br, "GET", path)
		io.Copy(io.Discard, resp.Body)
		sizes = append(sizes, cc.n-int64(br.Buffered())-before)
	}
	c.Close()
	r.Wait()
	es := rec.Entries()
	if len(es) != 3 {
		t.Fatalf("%d entries, want 3: %+v", len(es), es)
	}
	client := c.LocalAddr().(*net.TCPAddr).AddrPort()
	for i, want := range []struct {
		target string
		status int
	}{{"/small", 200}, {"/nocontent", 204}, {"/big", 200}} {
		e := es[i]
		if e.Role != accesslog.BE || e.Target != want.target || e.Method != "GET" || e.Host != "be" ||
			e.Status != want.status || e.Bytes != sizes[i] || e.Served != accesslog.Here ||
			e.Client.Port() != client.Port() || e.Time.IsZero() || e.Total <= 0 || e.Latency != 0 {
			t.Errorf("entry %d = %+v, want %s %d with %d bytes, served here", i, e, want.target, want.status, sizes[i])
		}
	}
}

// Forwarded, moved, answered and refused requests each say so.
func TestAccessLogServedBy(t *testing.T) {
	local, other := newWebServer(t), newWebServer(t)
	remote := &Pool{Dial: dialer(other.addr), Name: "10.0.0.12"}
	t.Cleanup(remote.Close)
	ln, _ := net.Listen("tcp4", "127.0.0.1:0")
	dead := &Pool{Dial: dialer(ln.Addr().String()), Name: "10.0.0.13"}
	ln.Close()
	t.Cleanup(dead.Close)
	r := newRelay(t, local.addr)
	var rec accesslog.Recorder
	r.cfg.Access = rec.Log
	m := &fakeMover{outcome: Gone, r: r}
	r.cfg.Route = func(_, path string) Rules {
		switch path {
		case "/big":
			return Rules{Usable: []*Pool{remote}}
		case "/nocontent":
			return Rules{Usable: []*Pool{dead}}
		case "/echo":
			// Only this request moves: the mover comes in now (the
			// session's goroutine asks Route, then looks at Mover).
			r.cfg.Mover = m
			return Rules{Usable: []*Pool{remote}}
		}
		return Rules{Here: true}
	}
	c := connect(t, r)
	br := bufio.NewReader(c)
	for _, path := range []string{"/small", "/big", "/nocontent"} {
		io.Copy(io.Discard, get(t, c, br, "GET", path).Body)
	}
	fmt.Fprint(c, "GET /echo HTTP/1.1\r\nHost: be\r\n\r\n")
	if _, err := br.ReadByte(); err == nil {
		t.Error("a moved request was answered")
	}
	r.Wait()
	// A bad head: answered by the relay, with nothing to name.
	c2 := connect(t, r)
	fmt.Fprint(c2, "GET /a b c\r\n\r\n")
	if _, err := bufio.NewReader(c2).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	r.Wait()
	es := rec.Entries()
	want := []struct {
		target string
		status int
		served accesslog.Served
		be     string
	}{
		{"/small", 200, accesslog.Here, ""},
		{"/big", 200, accesslog.Forward, "10.0.0.12"},
		{"/nocontent", 503, accesslog.Answered, ""},
		{"/echo", 0, accesslog.Move, ""},
		{"", 400, accesslog.Answered, ""},
	}
	if len(es) != len(want) {
		t.Fatalf("%d entries, want %d: %+v", len(es), len(want), es)
	}
	for i, w := range want {
		e := es[i]
		if e.Target != w.target || e.Status != w.status || e.Served != w.served || e.BE != w.be || e.Bytes == 0 != (w.status == 0) {
			t.Errorf("entry %d = %+v, want %+v", i, e, w)
		}
	}
	if mv := es[3]; mv.Latency <= 0 || mv.Latency > time.Second {
		t.Errorf("move latency %v", mv.Latency)
	}
}
