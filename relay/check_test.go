package relay

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestCheck(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	if err := Check(context.Background(), addr, time.Second); err != nil {
		t.Errorf("a server answering 404: %v", err)
	}
	srv.Close()
	if err := Check(context.Background(), addr, time.Second); err == nil {
		t.Error("a closed port passed")
	}
	// A server that accepts and never answers fails within the timeout.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	start := time.Now()
	if err := Check(context.Background(), ln.Addr().String(), 200*time.Millisecond); err == nil {
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
	if err := Check(context.Background(), ln2.Addr().String(), time.Second); err == nil || !strings.Contains(err.Error(), "not HTTP") {
		t.Errorf("a non-HTTP server: %v", err)
	}
}
