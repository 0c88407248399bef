package be

import (
	"bytes"
	"net/netip"
	"testing"

	"tcpha/handoff/wire"
	"tcpha/relay"
)

// With proxyprotocol = on, nginx's TLS socket gets the PROXY v2 header the
// relay would have sent, ahead of the ClientHello, with sequence numbers
// before the client's first byte: what the socket acks next (ConnMagic)
// stays the client's. The dump the relay's fallback rebuilds is untouched.
func TestTLSRestore(t *testing.T) {
	hello := []byte{22, 3, 1, 0, 4, 1, 0, 0, 0}
	ci := &wire.ConnInfo{
		Client: netip.MustParseAddrPort("10.0.0.2:40000"), VIP: netip.MustParseAddrPort("10.0.0.100:443"),
		RcvSeq: 10, RecvQueue: hello,
	}
	if got := tlsRestore(ci, false); got != ci {
		t.Errorf("proxyprotocol off: a different dump %+v", got)
	}
	got := tlsRestore(ci, true)
	h := relay.ProxyHeaderV2(ci.Client, ci.VIP)
	if !bytes.Equal(got.RecvQueue, append(h, hello...)) {
		t.Errorf("receive queue % x, want the PROXY header and the ClientHello", got.RecvQueue)
	}
	if got.ConnMagic() != ci.ConnMagic() {
		t.Errorf("next sequence number %d, want the client's %d", got.ConnMagic(), ci.ConnMagic())
	}
	if want := uint32(10) - uint32(len(h)); got.RcvSeq != want { // wraps below 0
		t.Errorf("RcvSeq %d, want %d", got.RcvSeq, want)
	}
	if ci.RcvSeq != 10 || !bytes.Equal(ci.RecvQueue, hello) {
		t.Errorf("the client's dump changed: %+v", ci)
	}
}

func TestFormatTLSCounts(t *testing.T) {
	got := formatTLSCounts(map[string]int64{"delivered": 3, "dial": 1})
	if want := "tls_delivered=3 tls_relayed=1 tls_relayed_dial=1"; got != want {
		t.Errorf("%q, want %q", got, want)
	}
}
