package relay

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
)

// A forwarded request sent on a pooled connection to another BE's web
// server that closes it as the request comes, while that server takes no
// new connection (it stopped): the retry finds no connection, and the
// request gets a 503 with the client's connection kept. It used to close a
// connection the failed retry had already dropped (a nil *Upstream): a
// panic that took the whole agent down.
func TestForwardRetryToStoppedBE(t *testing.T) {
	local := newWebServer(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The other BE's web server: one connection, which answers once and
	// closes when the next request comes.
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother")
		http.ReadRequest(br)
	}()
	remote := &Pool{Dial: dialer(ln.Addr().String())}
	t.Cleanup(remote.Close)
	r := newRelay(t, local.addr)
	r.cfg.Route = func(path string) Rules {
		if path == "/other" {
			return Rules{Usable: []*Pool{remote}}
		}
		return Rules{Here: true}
	}
	c := connect(t, r)
	br := bufio.NewReader(c)
	if b := body(t, get(t, c, br, "GET", "/small")); b != "small" {
		t.Fatalf("first request: %q", b)
	}
	if b := body(t, get(t, c, br, "GET", "/other")); b != "other" {
		t.Fatalf("forwarded request: %q", b)
	}
	ln.Close() // the other web server stops: its pooled connection is not closed yet
	resp := get(t, c, br, "GET", "/other")
	if b := body(t, resp); resp.StatusCode != 503 || resp.Close {
		t.Errorf("forwarded request, its web server stopped: %d %q close=%v; want 503, kept", resp.StatusCode, b, resp.Close)
	}
	if b := body(t, get(t, c, br, "GET", "/small")); b != "small" {
		t.Errorf("the connection after the 503: %q", b)
	}
	if st := r.Stats(); st.Retries != 1 || st.BadGateways != 1 {
		t.Errorf("retries %d, bad gateways %d; want 1, 1", st.Retries, st.BadGateways)
	}
}

// A forwarded request whose write fails (the connection to the other BE's
// web server broke as it was dialed) gets a 503 with the client's
// connection kept; the broken connection goes with it. It used to stay
// with the session, and the client's next request for that BE was sent into
// it and got a 503 too, though the BE was fine.
func TestForwardWriteFailureDropsConnection(t *testing.T) {
	local, other := newWebServer(t), newWebServer(t)
	var dials atomic.Int64
	remote := &Pool{Dial: func(ctx context.Context) (*net.TCPConn, error) {
		c, err := dialer(other.addr)(ctx)
		if err == nil && dials.Add(1) == 1 {
			c.CloseWrite() // the first connection cannot carry a request
		}
		return c, err
	}}
	t.Cleanup(remote.Close)
	r := newRelay(t, local.addr)
	r.cfg.Route = func(path string) Rules {
		if path == "/echo" {
			return Rules{Usable: []*Pool{remote}}
		}
		return Rules{Here: true}
	}
	c := connect(t, r)
	br := bufio.NewReader(c)
	if b := body(t, get(t, c, br, "GET", "/small")); b != "small" {
		t.Fatalf("first request: %q", b)
	}
	// Not idempotent: not retried.
	io.WriteString(c, "POST /echo HTTP/1.1\r\nHost: be\r\nContent-Length: 3\r\n\r\nabc")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b := body(t, resp); resp.StatusCode != 503 || resp.Close {
		t.Fatalf("POST on a broken connection: %d %q close=%v; want 503, kept", resp.StatusCode, b, resp.Close)
	}
	resp = get(t, c, br, "GET", "/echo")
	if b := body(t, resp); resp.StatusCode != 200 {
		t.Errorf("the next request for that BE: %d %q, want 200 on a new connection", resp.StatusCode, b)
	}
	if n := dials.Load(); n != 2 {
		t.Errorf("%d connections dialed to the other BE, want 2", n)
	}
}
