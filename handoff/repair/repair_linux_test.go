package repair

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"tcpha/handoff/wire"
	"tcpha/internal/privtest"
	"tcpha/internal/testnet"
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

func tcpInfo(t *testing.T, c *net.TCPConn) *unix.TCPInfo {
	t.Helper()
	rc, _ := c.SyscallConn()
	var info *unix.TCPInfo
	var err error
	rc.Control(func(fd uintptr) { info, err = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) })
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// A blocked socket takes nothing in: the client's bytes stay unacknowledged
// at the client, and arrive once the socket is resumed.
func TestBlockThenResume(t *testing.T) {
	privtest.Require(t)
	client, srv := testnet.Pair(t)
	if err := Block(srv); err != nil {
		t.Fatal(err)
	}
	if _, err := Dump(srv, nil); err != nil {
		t.Fatal(err)
	}
	client.Write([]byte("while blocked"))
	time.Sleep(100 * time.Millisecond)
	if info := tcpInfo(t, client); info.Unacked == 0 {
		t.Fatal("the blocked socket acknowledged the client's bytes")
	}
	if err := Resume(srv); err != nil {
		t.Fatal(err)
	}
	srv.SetDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len("while blocked"))
	if _, err := io.ReadFull(srv, got); err != nil || string(got) != "while blocked" {
		t.Fatalf("after resume: %q %v (the client's retransmission should arrive)", got, err)
	}
	// Repair mode reset SO_REUSEADDR; Resume puts it back (FACTS.md).
	rc, _ := srv.SyscallConn()
	var v int
	rc.Control(func(fd uintptr) { v, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR) })
	if v != 1 {
		t.Errorf("SO_REUSEADDR %d after resume, want 1", v)
	}
}

// A rebuilt socket sends nothing, not even its window probe, until it is
// activated: a handoff that is never committed leaves no trace.
func TestRebuildSilentUntilActivate(t *testing.T) {
	privtest.Require(t)
	client, srv := testnet.Pair(t)
	if err := Block(srv); err != nil {
		t.Fatal(err)
	}
	ci, err := Dump(srv, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := CloseSilently(srv); err != nil {
		t.Fatal(err)
	}
	before := tcpInfo(t, client).Segs_in
	r, err := Rebuild(ci)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if got := tcpInfo(t, client).Segs_in; got != before {
		r.Discard()
		t.Fatalf("the client received %d segments from a socket still in repair mode", got-before)
	}
	conn, err := r.Activate()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.Write([]byte("hello"))
	client.SetDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 5)
	if _, err := io.ReadFull(client, b); err != nil || string(b) != "hello" {
		t.Fatalf("after activate: %q %v", b, err)
	}
	r.Discard() // idempotent after Activate
}

// Queues larger than one peek are dumped whole: a receive queue the server
// has not read, and a send queue the client has not acknowledged (its
// receive buffer is full).
func TestDumpLargeQueues(t *testing.T) {
	privtest.Require(t)
	client, srv := testnet.Pair(t)
	in := bytes.Repeat([]byte("r"), 10000)
	client.Write(in)
	out := bytes.Repeat([]byte("s"), 8<<20)
	go srv.Write(out) // blocks once the client's buffer is full
	time.Sleep(200 * time.Millisecond)
	if err := Block(srv); err != nil {
		t.Fatal(err)
	}
	ci, err := Dump(srv, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ci.RecvQueue, in) {
		t.Errorf("receive queue: %d bytes, want %d", len(ci.RecvQueue), len(in))
	}
	if len(ci.SendQueue) <= peekChunk || !bytes.Equal(ci.SendQueue, out[:len(ci.SendQueue)]) {
		t.Errorf("send queue: %d bytes (want more than %d, all 's')", len(ci.SendQueue), peekChunk)
	}
	if int(ci.Unsent) > len(ci.SendQueue) {
		t.Errorf("unsent %d of %d", ci.Unsent, len(ci.SendQueue))
	}
	t.Logf("send queue %d bytes, %d unsent", len(ci.SendQueue), ci.Unsent)
	if err := Resume(srv); err != nil {
		t.Fatal(err)
	}
}

// WaitAcked returns only once the client acknowledged everything sent: a
// client whose socket drops the data (blocked) holds it back.
func TestWaitAcked(t *testing.T) {
	privtest.Require(t)
	client, srv := testnet.Pair(t)
	if err := Block(client); err != nil {
		t.Fatal(err)
	}
	srv.Write([]byte("response"))
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	err := WaitAcked(ctx, srv)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("with the response unacknowledged: %v", err)
	}
	if err := control(client, "unblock", detachDrop); err != nil {
		t.Fatal(err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := WaitAcked(ctx, srv); err != nil {
		t.Fatalf("after the retransmission was acknowledged: %v", err)
	}
}

// A dumped socket out of repair mode but still blocked: a plain close (its
// process dying) ends the connection with a FIN the client sees, and
// CloseSilently still closes it without a packet.
func TestLeaveRepair(t *testing.T) {
	privtest.Require(t)
	for _, silent := range []bool{false, true} {
		client, srv := testnet.Pair(t)
		if err := Block(srv); err != nil {
			t.Fatal(err)
		}
		if _, err := Dump(srv, nil); err != nil {
			t.Fatal(err)
		}
		if err := LeaveRepair(srv); err != nil {
			t.Fatal(err)
		}
		if silent {
			CloseSilently(srv)
		} else {
			srv.Close()
		}
		client.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		_, err := client.Read(make([]byte, 1))
		switch {
		case silent && !errors.Is(err, os.ErrDeadlineExceeded):
			t.Errorf("closed silently: the client read %v, want nothing", err)
		case !silent && !errors.Is(err, io.EOF):
			t.Errorf("closed: the client read %v, want EOF", err)
		}
	}
}

// A rebuilt socket that is neither activated nor discarded — its process
// died first — ends the connection with a FIN the client sees, not
// silence; one discarded sends nothing.
func TestRebuiltClosedByItsDeath(t *testing.T) {
	privtest.Require(t)
	for _, discard := range []bool{false, true} {
		client, srv := testnet.Pair(t)
		Block(srv)
		ci, err := Dump(srv, nil)
		if err != nil {
			t.Fatal(err)
		}
		CloseSilently(srv)
		r, err := Rebuild(ci)
		if err != nil {
			t.Fatal(err)
		}
		if discard {
			r.Discard()
		} else {
			r.conn.Close() // what the kernel does when the process dies
		}
		client.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		_, err = client.Read(make([]byte, 1))
		switch {
		case discard && !errors.Is(err, os.ErrDeadlineExceeded):
			t.Errorf("discarded: the client read %v, want nothing", err)
		case !discard && !errors.Is(err, io.EOF):
			t.Errorf("closed by its death: the client read %v, want EOF", err)
		}
	}
}
