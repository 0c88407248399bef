package netaddr

import (
	"net"
	"net/netip"
	"testing"
)

func TestAddrPort(t *testing.T) {
	want := netip.MustParseAddrPort("10.0.0.1:80")
	for _, a := range []net.Addr{
		&net.TCPAddr{IP: net.ParseIP("10.0.0.1"), Port: 80}, // 16-byte form, as the kernel gives it
		&net.TCPAddr{IP: net.IPv4(10, 0, 0, 1).To4(), Port: 80},
		&net.UDPAddr{IP: net.ParseIP("::ffff:10.0.0.1"), Port: 80},
	} {
		if got := AddrPort(a); got != want {
			t.Errorf("%v: %v, want %v", a, got, want)
		}
	}
	if got := AddrPort(&net.UnixAddr{Name: "/run/x"}); got.IsValid() {
		t.Errorf("a unix address: %v", got)
	}
	if got := AddrPort(nil); got.IsValid() {
		t.Errorf("nil: %v", got)
	}
}
