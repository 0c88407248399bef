package repair

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"tcpha/handoff/wire"
	"tcpha/internal/privtest"
)

// A live loopback connection is dumped after the server read part of the
// request, closed silently and rebuilt: the client notices nothing, the
// rebuilt socket reads the whole request, and both directions keep working.
func TestDumpRestoreLoopback(t *testing.T) {
	privtest.Require(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.Write([]byte("GET /x HTTP/1.1\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 4)
	if _, err := io.ReadFull(srv, head); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // let the rest of the request arrive

	ci, err := Dump(srv.(*net.TCPConn), head)
	if err != nil {
		t.Fatal(err)
	}
	if string(ci.RecvQueue) != "GET /x HTTP/1.1\r\n\r\n" {
		t.Errorf("receive queue %q", ci.RecvQueue)
	}
	if ci.Client.String() != client.LocalAddr().String() || ci.VIP.String() != ln.Addr().String() {
		t.Errorf("addresses %v -> %v", ci.Client, ci.VIP)
	}
	if ci.Options&wire.OptWScale == 0 || ci.Options&wire.OptTimestamps == 0 || ci.MSS < 1000 {
		t.Errorf("options 0x%x mss %d: loopback negotiates wscale and timestamps", ci.Options, ci.MSS)
	}
	if err := CloseSilently(srv.(*net.TCPConn)); err != nil {
		t.Fatal(err)
	}
	// Through the wire format, as a BE would get it.
	b, err := ci.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var got wire.ConnInfo
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	rebuilt, err := Restore(&got)
	if err != nil {
		t.Fatal(err)
	}
	defer rebuilt.Close()

	rebuilt.SetDeadline(time.Now().Add(5 * time.Second))
	client.SetDeadline(time.Now().Add(5 * time.Second))
	req := make([]byte, len(ci.RecvQueue))
	if _, err := io.ReadFull(rebuilt, req); err != nil || !bytes.Equal(req, ci.RecvQueue) {
		t.Fatalf("rebuilt socket read %q, %v", req, err)
	}
	// 1 MB the other way checks window scaling and the send path.
	resp := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
	go rebuilt.Write(resp)
	got2 := make([]byte, len(resp))
	if _, err := io.ReadFull(client, got2); err != nil || !bytes.Equal(got2, resp) {
		t.Fatalf("client read after restore: %v", err)
	}
	if _, err := client.Write([]byte("more")); err != nil {
		t.Fatal(err)
	}
	more := make([]byte, 4)
	if _, err := io.ReadFull(rebuilt, more); err != nil || string(more) != "more" {
		t.Fatalf("second request: %q %v", more, err)
	}
}

// Resume returns a dumped socket to service, for a handoff that failed.
func TestDumpResume(t *testing.T) {
	privtest.Require(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Dump(srv.(*net.TCPConn), nil); err != nil {
		t.Fatal(err)
	}
	if err := Resume(srv.(*net.TCPConn)); err != nil {
		t.Fatal(err)
	}
	client.SetDeadline(time.Now().Add(5 * time.Second))
	srv.Write([]byte("503"))
	b := make([]byte, 3)
	if _, err := io.ReadFull(client, b); err != nil || string(b) != "503" {
		t.Fatalf("after resume: %q %v", b, err)
	}
}
