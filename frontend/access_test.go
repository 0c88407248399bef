package frontend

import (
	"io"
	"net"
	"testing"
	"time"

	"tcpha/backends"
	"tcpha/handoff"
	"tcpha/internal/accesslog"
)

// The FE writes one line per connection: the handoff with its BE and
// latency, a 503 with no BE, a 400 for a bad head; nothing for a client
// that left without a request.
func TestAccessLogPerConnection(t *testing.T) {
	var rec accesslog.Recorder
	cfg := defaults()
	cfg.Access = rec.Log
	r := newRig(t, cfg, toBE())
	if _, _, err := request(t, r.addr, "GET /a%20b?q HTTP/1.1\r\nHost: WWW.Example:80\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the handoff's line", func() bool { return len(rec.Entries()) == 1 })
	r.m.fail = handoff.ErrNoBE
	if resp, _, err := request(t, r.addr, "GET /b HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil || resp.StatusCode != 503 {
		t.Fatalf("no BE: %v %v", resp, err)
	}
	waitFor(t, "the 503's line", func() bool { return len(rec.Entries()) == 2 })
	if resp, _, err := request(t, r.addr, "GET /c d HTTP/1.1\r\n\r\n"); err != nil || resp.StatusCode != 400 {
		t.Fatalf("bad head: %v %v", resp, err)
	}
	waitFor(t, "the 400's line", func() bool { return len(rec.Entries()) == 3 })
	c, err := net.Dial("tcp4", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	waitFor(t, "the empty connection", func() bool { return r.s.Stats().ClosedEarly == 1 })

	es := rec.Entries()
	if len(es) != 3 {
		t.Fatalf("%d lines, want 3: %+v", len(es), es)
	}
	h := es[0]
	if h.Role != accesslog.FE || h.Served != accesslog.Handoff || h.BE != "10.0.0.11" || h.Host != "www.example" ||
		h.Method != "GET" || h.Target != "/a%20b?q" || h.Status != 0 || h.Latency <= 0 || h.Total < h.Latency ||
		!h.Client.Addr().IsLoopback() || time.Since(h.Time) > time.Minute {
		t.Errorf("handoff line %+v", h)
	}
	if e := es[1]; e.Served != accesslog.Answered || e.Status != 503 || e.Bytes == 0 || e.BE != "" || e.Target != "/b" {
		t.Errorf("503 line %+v", e)
	}
	if e := es[2]; e.Served != accesslog.Answered || e.Status != 400 || e.Bytes == 0 || e.Target != "" {
		t.Errorf("400 line %+v", e)
	}
}

// A connection served by the FE's own web server is one line, written
// when it ends.
func TestAccessLogLocal(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
		c.Close()
	}()
	var rec accesslog.Recorder
	cfg := defaults()
	cfg.Access = rec.Log
	cfg.Local = ln.Addr().(*net.TCPAddr).AddrPort()
	r := newRig(t, cfg, backends.Route{Local: true})
	if resp, body, err := request(t, r.addr, "GET / HTTP/1.1\r\n\r\n"); err != nil || body != "ok" {
		t.Fatalf("local: %v %q %v", resp, body, err)
	}
	waitFor(t, "the local line", func() bool { return len(rec.Entries()) == 1 })
	if e := rec.Entries()[0]; e.Served != accesslog.Local || e.BE != cfg.Local.String() || e.Target != "/" {
		t.Errorf("local line %+v", e)
	}
}
