package relay

import (
	"bufio"
	"io"
	"net"
	"net/http"
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
