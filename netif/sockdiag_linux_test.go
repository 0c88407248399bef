package netif

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"tcpha/internal/privtest"
)

func TestInetDiagReqLayout(t *testing.T) {
	b := inetDiagReq(netip.MustParseAddrPort("10.0.0.100:80"), netip.MustParseAddrPort("10.0.0.10:40000"))
	if len(b) != sizeofInetDiagReqV2 {
		t.Fatalf("%d bytes", len(b))
	}
	if b[0] != 2 || b[1] != 6 || binary.BigEndian.Uint16(b[8:]) != 80 || binary.BigEndian.Uint16(b[10:]) != 40000 {
		t.Errorf("header or ports: % x", b[:12])
	}
	if netip.AddrFrom4([4]byte(b[12:16])).String() != "10.0.0.100" || netip.AddrFrom4([4]byte(b[28:32])).String() != "10.0.0.10" {
		t.Errorf("addresses: % x", b[12:44])
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// The lookup finds the one socket of a 4-tuple among many, and SOCK_DESTROY
// removes a TIME_WAIT left by a server-side close.
func TestLookupAndDestroy(t *testing.T) {
	privtest.Require(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var clients, servers []net.Conn
	for range 5 { // several sockets: a dump would return them all
		c, _ := net.Dial("tcp4", ln.Addr().String())
		s, _ := ln.Accept()
		clients, servers = append(clients, c), append(servers, s)
	}
	local, remote := addrPort(servers[2].LocalAddr()), addrPort(servers[2].RemoteAddr())
	if s, err := LookupTCP(local, remote); err != nil || s.State != TCPEstablished {
		t.Fatalf("established socket: state %d, %v", s.State, err)
	}
	servers[2].Close() // the server closes first: its side ends in TIME_WAIT
	io.ReadAll(clients[2])
	clients[2].Close()
	time.Sleep(50 * time.Millisecond)
	s, err := LookupTCP(local, remote)
	if err != nil || s.State != TCPTimeWait {
		t.Fatalf("after the close: state %d, %v; want TIME_WAIT", s.State, err)
	}
	if err := DestroyTCP(local, remote, s); err != nil {
		t.Fatal(err)
	}
	if s, err := LookupTCP(local, remote); !errors.Is(err, ErrNoSocket) {
		t.Errorf("after destroy: state %d %v, want ErrNoSocket", s.State, err)
	}
	// A tuple without a socket, on a port with a listener: the kernel
	// answers with the listener, which is not the tuple's.
	lp := addrPort(ln.Addr())
	if _, err := LookupTCP(lp, netip.MustParseAddrPort("127.0.0.1:2")); !errors.Is(err, ErrNoSocket) {
		t.Errorf("unknown tuple beside a listener: %v", err)
	}
	if c, err := net.Dial("tcp4", ln.Addr().String()); err != nil {
		t.Errorf("the listener is gone: %v", err)
	} else {
		c.Close()
	}
	for i := range clients {
		clients[i].Close()
		servers[i].Close()
	}
}

// The answer carries the socket's inode: the accepted end's is the inode
// of the file accept returned, and the tuple local ↔ 0.0.0.0:0 finds the
// listener itself (handoff/transplant looks both up).
func TestLookupInode(t *testing.T) {
	privtest.Require(t)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	inode := func(c syscall.Conn) uint32 {
		rc, _ := c.SyscallConn()
		var st unix.Stat_t
		rc.Control(func(fd uintptr) { unix.Fstat(int(fd), &st) })
		return uint32(st.Ino)
	}
	got, err := LookupTCP(addrPort(s.LocalAddr()), addrPort(s.RemoteAddr()))
	if err != nil || got.Inode == 0 || got.Inode != inode(s.(*net.TCPConn)) {
		t.Errorf("accepted end: inode %d, %v; want %d", got.Inode, err, inode(s.(*net.TCPConn)))
	}
	l, err := LookupTCP(addrPort(ln.Addr()), netip.MustParseAddrPort("0.0.0.0:0"))
	if err != nil || l.Inode != inode(ln.(*net.TCPListener)) {
		t.Errorf("listener: inode %d, %v; want %d", l.Inode, err, inode(ln.(*net.TCPListener)))
	}
}
