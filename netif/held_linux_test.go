package netif

import (
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// HeldTCP lists a local end's connections in every state but TIME_WAIT:
// a server-side close is held until the client's FIN completes it. A dump
// needs no privilege.
func TestHeldTCP(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	local := addrPort(ln.Addr())
	var clients []net.Conn
	var servers []net.Conn
	var want []netip.AddrPort
	for range 3 {
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
		clients, servers = append(clients, c), append(servers, s)
		want = append(want, addrPort(c.LocalAddr()))
	}
	slices.SortFunc(want, netip.AddrPort.Compare)
	wait := func(want []netip.AddrPort) {
		t.Helper()
		var got []netip.AddrPort
		for range 100 {
			if got, err = HeldTCP(local); err == nil && slices.Equal(got, want) {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("HeldTCP(%v) = %v, %v; want %v", local, got, err, want)
	}
	wait(want)
	// The server closes first: FIN_WAIT2 is still held.
	servers[0].Close()
	wait(want)
	// The client's FIN completes it: TIME_WAIT is not.
	clients[0].Close()
	wait(slices.DeleteFunc(slices.Clone(want), func(a netip.AddrPort) bool { return a == addrPort(clients[0].LocalAddr()) }))
	// Another local port holds nothing of these.
	if got, err := HeldTCP(netip.AddrPortFrom(local.Addr(), 1)); err != nil || len(got) != 0 {
		t.Errorf("another port: %v, %v", got, err)
	}
}
