package relay

import (
	"bytes"
	"encoding/hex"
	"net/netip"
	"strings"
	"testing"
)

// Byte for byte against the layout of haproxy's proxy-protocol.txt,
// section 2.2. The IPv4 case is a header haproxy itself wrote (a capture
// published in seriousben/experiment-proxy-protocol's README:
// 172.19.0.1:42578 to 172.19.0.3:80).
func TestProxyHeaderV2(t *testing.T) {
	for _, c := range []struct {
		name     string
		src, dst string
		want     string // hex, spaces ignored
	}{
		{"haproxy's own IPv4 header", "172.19.0.1:42578", "172.19.0.3:80",
			"0d0a0d0a000d0a515549540a 21 11 000c ac130001 ac130003 a652 0050"},
		{"client to the VIP's TLS port", "10.0.0.10:40000", "10.0.0.100:443",
			"0d0a0d0a000d0a515549540a 21 11 000c 0a00000a 0a000064 9c40 01bb"},
		{"IPv4-mapped is IPv4", "[::ffff:10.0.0.10]:1", "10.0.0.100:2",
			"0d0a0d0a000d0a515549540a 21 11 000c 0a00000a 0a000064 0001 0002"},
		{"IPv6", "[2001:db8::1]:40000", "[2001:db8::64]:443",
			"0d0a0d0a000d0a515549540a 21 21 0024 20010db8000000000000000000000001 20010db8000000000000000000000064 9c40 01bb"},
	} {
		want, err := hex.DecodeString(strings.ReplaceAll(c.want, " ", ""))
		if err != nil {
			t.Fatal(err)
		}
		got := ProxyHeaderV2(netip.MustParseAddrPort(c.src), netip.MustParseAddrPort(c.dst))
		if !bytes.Equal(got, want) {
			t.Errorf("%s:\n got % x\nwant % x", c.name, got, want)
		}
	}
}
