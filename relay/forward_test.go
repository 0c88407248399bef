package relay

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
)

// forwarding serves a client connection whose later requests for path are
// fetched from pool's web server (phttp = forward), after a first request
// served here.
func forwarding(t *testing.T, path string, pool *Pool) (*Relay, net.Conn, *bufio.Reader) {
	t.Helper()
	t.Cleanup(pool.Close)
	local := newWebServer(t)
	r := newRelay(t, local.addr)
	r.cfg.Route = func(_, p string) Rules {
		if p == path {
			return Rules{Usable: []*Pool{pool}}
		}
		return Rules{Here: true}
	}
	c := connect(t, r)
	br := bufio.NewReader(c)
	if b := body(t, get(t, c, br, "GET", "/small")); b != "small" {
		t.Fatalf("first request: %q", b)
	}
	return r, c, br
}

// A forwarded request sent on a pooled connection to another BE's web
// server that closes it as the request comes, while that server takes no
// new connection (it stopped): the retry finds no connection, and the
// request gets a 503 with the client's connection kept. It used to close a
// connection the failed retry had already dropped (a nil *Upstream): a
// panic that took the whole agent down.
func TestForwardRetryToStoppedBE(t *testing.T) {
	// One answer a connection; the next request closes it.
	addr, _ := rawServer(t, 1, true, func(int) string { return "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nother" })
	var stopped atomic.Bool
	remote := &Pool{Dial: func(ctx context.Context) (*net.TCPConn, error) {
		if stopped.Load() {
			return nil, errors.New("connection refused")
		}
		return dialer(addr)(ctx)
	}}
	r, c, br := forwarding(t, "/other", remote)
	if b := body(t, get(t, c, br, "GET", "/other")); b != "other" {
		t.Fatalf("forwarded request: %q", b)
	}
	stopped.Store(true) // the other web server stops: its pooled connection is not closed yet
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
	other := newWebServer(t)
	var dials atomic.Int64
	remote := &Pool{Dial: func(ctx context.Context) (*net.TCPConn, error) {
		c, err := dialer(other.addr)(ctx)
		if err == nil && dials.Add(1) == 1 {
			c.CloseWrite() // the first connection cannot carry a request
		}
		return c, err
	}}
	_, c, br := forwarding(t, "/echo", remote)
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
