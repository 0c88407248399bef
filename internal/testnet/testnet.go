// Package testnet holds network helpers the tests of several packages
// share.
package testnet

import (
	"net"
	"testing"
)

// Accepted returns both ends of a new loopback TCP connection: the
// client's, and the server's as accepted. The caller owns both.
func Accepted(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		c.Close()
		t.Fatal(err)
	}
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// Pair is Accepted, both ends closed when the test ends.
func Pair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	c, s := Accepted(t)
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}
