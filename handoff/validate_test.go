package handoff

import (
	"net/netip"
	"strings"
	"testing"

	"tcpha/handoff/wire"
)

func TestCheckClient(t *testing.T) {
	vip := netip.MustParseAddr("10.0.0.100")
	local := func(a netip.Addr) bool {
		return a == netip.MustParseAddr("10.0.0.11") || a == netip.MustParseAddr("10.0.0.255")
	}
	cases := []struct {
		client string
		sendq  string
		want   string // "" = accepted
	}{
		{"10.0.0.10:40000", "", ""},
		{"203.0.113.7:1", "", ""},
		{"0.0.0.0:1", "", "0.0.0.0/8"},
		{"0.1.2.3:80", "", "0.0.0.0/8"},
		{"127.0.0.1:80", "", "loopback"},
		{"127.9.9.9:80", "", "loopback"},
		{"224.0.0.1:80", "", "not a unicast"},
		{"255.255.255.255:80", "", "not a unicast"},
		{"240.0.0.1:80", "", "not a unicast"},
		{"10.0.0.100:40000", "", "the VIP"},
		{"10.0.0.11:40000", "", "this host"},
		{"10.0.0.255:40000", "", "this host"},
		{"10.0.0.10:0", "", "port 0"},
		{"10.0.0.10:40000", "HTTP/1.1 200 OK", "send queue"},
	}
	for _, tc := range cases {
		ci := &wire.ConnInfo{Client: netip.MustParseAddrPort(tc.client), VIP: netip.AddrPortFrom(vip, 80),
			SendQueue: []byte(tc.sendq)}
		err := CheckClient(ci, vip, local)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: refused: %v", tc.client, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s send %q: got %v, want an error about %q", tc.client, tc.sendq, err, tc.want)
		}
	}
}
