package relay

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"tcpha/backends"
)

func TestCheck(t *testing.T) {
	// The check's request reaches the server as configured, and its
	// status is judged: 500 is down under the default 200-399.
	var got string
	status := http.StatusOK
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.Method + " " + r.URL.Path + " " + r.Host + " " + r.UserAgent()
		w.WriteHeader(status)
	}))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	chk, err := backends.ParseCheck("GET /health host=www.example")
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(context.Background(), addr, chk, time.Second); err != nil {
		t.Errorf("a server answering 200: %v", err)
	}
	if want := "GET /health www.example tcpha-check"; got != want {
		t.Errorf("the server saw %q, want %q", got, want)
	}
	status = http.StatusInternalServerError
	if err := Check(context.Background(), addr, chk, time.Second); err == nil || !strings.Contains(err.Error(), "answered 500") {
		t.Errorf("a server answering 500: %v", err)
	}
	chk.Expect = backends.Expect{{Lo: 500, Hi: 500}}
	if err := Check(context.Background(), addr, chk, time.Second); err != nil {
		t.Errorf("a 500 with checkexpect = 500: %v", err)
	}
	srv.Close()
	if err := Check(context.Background(), addr, chk, time.Second); err == nil {
		t.Error("a closed port passed")
	}
	// A server that accepts and never answers fails within the timeout.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	start := time.Now()
	if err := Check(context.Background(), ln.Addr().String(), backends.DefaultCheck, 200*time.Millisecond); err == nil {
		t.Error("a silent server passed")
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("took %v", took)
	}
	// One that answers something else fails too.
	ln2, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	go func() {
		c, err := ln2.Accept()
		if err == nil {
			c.Write([]byte("SSH-2.0-OpenSSH\r\n"))
			c.Close()
		}
	}()
	if err := Check(context.Background(), ln2.Addr().String(), backends.DefaultCheck, time.Second); err == nil || !strings.Contains(err.Error(), "not HTTP") {
		t.Errorf("a non-HTTP server: %v", err)
	}
}
