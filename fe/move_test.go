package fe

import (
	"net/netip"
	"strings"
	"tcpha/backends"
	"testing"

	"tcpha/handoff/wire"
	"tcpha/phttp"
)

// The FE checks a BE's migrate request before it moves anything, and says
// what is wrong with a bad one.
func TestParseMigration(t *testing.T) {
	vip := netip.MustParseAddrPort("10.0.0.100:80")
	good := wire.ConnInfo{Client: netip.MustParseAddrPort("10.0.0.10:40000"), VIP: vip, MSS: 1460,
		RecvQueue: []byte("GET /img/a.jpg HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n")}
	frame := func(ci wire.ConnInfo, magic int) wire.Frame {
		p, err := ci.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return wire.Frame{Type: wire.TypeMigrate, ConnMagic: ci.ConnMagic() + uint32(magic), Payload: p}
	}
	ci, q, res, why := parseMigration(frame(good, 0), vip, 64)
	if res != wire.ResultOK || q != (backends.Request{Host: "x", Path: "/img/a.jpg"}) || ci.Client != good.Client {
		t.Fatalf("good request: %v %+v %v %s", ci, q, res, why)
	}
	other := good
	other.VIP = netip.MustParseAddrPort("10.0.0.101:80")
	sendq := good
	sendq.SendQueue = []byte("unacked")
	nohead := good
	nohead.RecvQueue = []byte("GET /img/a.jpg HTTP/1.1\r\nHost:")
	for name, tc := range map[string]struct {
		f    wire.Frame
		max  int
		res  wire.Result
		says string
	}{
		"garbage":        {wire.Frame{Type: wire.TypeMigrate, Payload: []byte{1, 2, 3}}, 64, wire.ResultBadFrame, ""},
		"conn_magic":     {frame(good, 1), 64, wire.ResultBadFrame, "conn_magic"},
		"another VIP":    {frame(other, 0), 64, wire.ResultWrongVIP, "10.0.0.101:80"},
		"unacknowledged": {frame(sendq, 0), 64, wire.ResultInvalid, "send queue"},
		"no whole head":  {frame(nohead, 0), 64, wire.ResultInvalid, "no request head"},
		"head too large": {frame(good, 0), 20, wire.ResultInvalid, "within 20 bytes"},
	} {
		_, _, res, why := parseMigration(tc.f, vip, tc.max)
		if res != tc.res || !strings.Contains(why, tc.says) {
			t.Errorf("%s: %v %q, want %v saying %q", name, res, why, tc.res, tc.says)
		}
	}
}

// A migrate request is a BE's bytes: whatever they are, parseMigration
// answers without a panic, and what it accepts is a connection of the
// FE's VIP with nothing unacknowledged and a request head within maxHeader.
func FuzzParseMigration(f *testing.F) {
	vip := netip.MustParseAddrPort("10.0.0.100:80")
	ci := wire.ConnInfo{Client: netip.MustParseAddrPort("10.0.0.10:40000"), VIP: vip, MSS: 1460,
		RecvQueue: []byte("GET /img/a.jpg HTTP/1.1\r\nHost: x\r\n\r\n")}
	p, err := ci.MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(p, ci.ConnMagic(), uint16(64))
	f.Add(p, ci.ConnMagic()+1, uint16(8))
	f.Fuzz(func(t *testing.T, payload []byte, magic uint32, maxHeader uint16) {
		fr := wire.Frame{Type: wire.TypeMigrate, ConnMagic: magic, Payload: payload}
		got, q, res, why := parseMigration(fr, vip, int(maxHeader))
		if res != wire.ResultOK {
			if why == "" {
				t.Fatalf("%v without a reason", res)
			}
			return
		}
		if got.VIP != vip || len(got.SendQueue) > 0 || got.ConnMagic() != magic || q.Path == "" {
			t.Fatalf("accepted %+v, request %+v", got, q)
		}
		h, err := phttp.ParseRequest(got.RecvQueue[:min(len(got.RecvQueue), int(maxHeader))])
		if err != nil || h.Len > int(maxHeader) || h.Path != q.Path || h.Host != q.Host {
			t.Fatalf("accepted a head of %v bytes (max %d): %v", h, maxHeader, err)
		}
	})
}
