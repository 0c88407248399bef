package be

import (
	"bytes"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"tcpha/backends"
	"tcpha/config"
	"tcpha/handoff/wire"
)

// A BE compiles the FE's cluster frame into its own scheduler, and refuses
// one that does not compile.
func TestClusterOf(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	frame := func(pattern, policy string) []byte {
		b, err := wire.Cluster{PHTTP: wire.PHTTPForward, Policy: policy,
			Servers: []wire.ClusterServer{{Addr: be1, Port: 666, Weight: 1}, {Addr: be2, Port: 666, Weight: 1}},
			Rules:   []wire.ClusterRule{{Targets: []netip.Addr{be2}, Pattern: pattern}, {Targets: []netip.Addr{be1}, Pattern: ".*"}}}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	c, err := clusterOf(frame(`\.jpg$`, "wlc"))
	if err != nil {
		t.Fatal(err)
	}
	if c.phttp != wire.PHTTPForward || !c.sched.Holds(backends.Request{Path: "/a.jpg"}, be2) || c.sched.Holds(backends.Request{Path: "/a.jpg"}, be1) || !c.sched.Holds(backends.Request{Path: "/a.html"}, be1) {
		t.Errorf("compiled cluster routes wrongly")
	}
	for _, bad := range [][]byte{frame(`(`, ""), frame(`x`, "fastest"), []byte{9}} {
		if _, err := clusterOf(bad); err == nil {
			t.Errorf("%q compiled", bad)
		}
	}
	// Host rules: the BE routes later requests by their own Host.
	hosts := func(host string) []byte {
		b, err := wire.Cluster{PHTTP: wire.PHTTPMulti,
			Servers: []wire.ClusterServer{{Addr: be1, Port: 666, Weight: 1}, {Addr: be2, Port: 666, Weight: 1}},
			Rules:   []wire.ClusterRule{{Targets: []netip.Addr{be2}, Host: host}, {Targets: []netip.Addr{be1}, Pattern: ".*"}}}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if c, err = clusterOf(hosts(`img\.example`)); err != nil {
		t.Fatal(err)
	}
	if !c.sched.Holds(backends.Request{Host: "img.example", Path: "/"}, be2) || !c.sched.Holds(backends.Request{Host: "www.example", Path: "/"}, be1) {
		t.Error("host rules from the cluster frame route wrongly")
	}
	if _, err := clusterOf(hosts(`(`)); err == nil {
		t.Error("a bad host pattern compiled")
	}
}

// A BE routes a later request by the FE's cluster frame: its own content
// here; another BE's to that BE; and with the only BE a rule names out
// (its agent stopped: weight 0 in the frame), to that BE's web server,
// never here (issue 19).
func TestBERoute(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	frame := func(w1 uint16) *beCluster {
		p, err := wire.Cluster{PHTTP: wire.PHTTPMulti,
			Servers: []wire.ClusterServer{{Addr: be1, Port: 666, Weight: w1}, {Addr: be2, Port: 666, Weight: 1}},
			Rules:   []wire.ClusterRule{{Targets: []netip.Addr{be2}, Pattern: `\.jpg$`}, {Targets: []netip.Addr{be1}, Pattern: ".*"}}}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		c, err := clusterOf(p)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	b := &BE{cfg: &config.BE{RAddr: be2, RedirectPort: 80}}
	t.Cleanup(b.closeWeb)
	b.cluster.Store(frame(1))
	if r := b.route("", "/a.jpg"); !r.Here {
		t.Errorf("be2's own content: %+v", r)
	}
	if r := b.route("", "/index.html"); r.Here || len(r.Usable) != 1 || r.Usable[0] != b.webPool(be1) {
		t.Errorf("be1's content, be1 up: %+v", r)
	}
	b.cluster.Store(frame(0))
	if r := b.route("", "/index.html"); r.Here || len(r.Usable) != 0 || len(r.Named) != 1 || r.Named[0] != b.webPool(be1) {
		t.Errorf("be1's content, be1 out: %+v, want its web server named", r)
	}
}

// A BE takes control sessions only from an FE that serves its VIP and says
// so from its own address.
func TestAdmit(t *testing.T) {
	vip := netip.MustParseAddr("10.0.0.100")
	b := &BE{cfg: &config.BE{VAddr: vip}}
	fe := netip.MustParseAddr("10.0.0.1")
	from := &net.TCPAddr{IP: net.ParseIP("10.0.0.1"), Port: 40000} // 4-in-6, as accept gives it
	hello := wire.Hello{Role: wire.RoleFE, Addr: netip.AddrPortFrom(fe, 0), VIP: netip.AddrPortFrom(vip, 80)}
	if err := b.admit(from, hello); err != nil {
		t.Errorf("its FE: %v", err)
	}
	any := hello
	any.Addr = netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	if err := b.admit(from, any); err != nil {
		t.Errorf("its FE on raddr 0.0.0.0: %v", err)
	}
	for name, tc := range map[string]struct {
		change func(*wire.Hello)
		says   string
	}{
		"a BE outside the cluster frame": {func(h *wire.Hello) { h.Role = wire.RoleBE }, "not a BE of this cluster"},
		"a client":                       {func(h *wire.Hello) { h.Role = wire.Role(9) }, "may not open sessions"},
		"spoofed":                        {func(h *wire.Hello) { h.Addr = netip.MustParseAddrPort("10.0.0.2:0") }, "claims 10.0.0.2"},
		"another VIP":                    {func(h *wire.Hello) { h.VIP = netip.MustParseAddrPort("10.0.0.101:80") }, "serves VIP 10.0.0.101"},
		"no VIP port":                    {func(h *wire.Hello) { h.VIP = netip.AddrPortFrom(vip, 0) }, "no VIP port"},
	} {
		h := hello
		tc.change(&h)
		if err := b.admit(from, h); err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%s: %v, want %q", name, err, tc.says)
		}
	}
}

// Another BE of the FE's cluster frame may open a session, for direct
// moves, from its own address and for this BE's VIP.
func TestAdmitPeerBE(t *testing.T) {
	vip, peer := netip.MustParseAddr("10.0.0.100"), netip.MustParseAddr("10.0.0.12")
	b := &BE{cfg: &config.BE{VAddr: vip, RAddr: netip.MustParseAddr("10.0.0.11")}}
	p, err := wire.Cluster{Servers: []wire.ClusterServer{{Addr: b.cfg.RAddr, Port: 666, Weight: 1}, {Addr: peer, Port: 666, Weight: 1}},
		Rules: []wire.ClusterRule{{Targets: []netip.Addr{peer}, Pattern: ".*"}}}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	c, err := clusterOf(p)
	if err != nil {
		t.Fatal(err)
	}
	b.cluster.Store(c)
	from := &net.TCPAddr{IP: net.ParseIP(peer.String()), Port: 40000}
	hello := wire.Hello{Role: wire.RoleBE, Addr: netip.AddrPortFrom(peer, 666), VIP: netip.AddrPortFrom(vip, 0)}
	if err := b.admit(from, hello); err != nil {
		t.Errorf("a BE of the cluster: %v", err)
	}
	spoofed := hello
	spoofed.Addr = netip.MustParseAddrPort("10.0.0.13:666")
	if err := b.admit(from, spoofed); err == nil {
		t.Error("a BE claiming another address was admitted")
	}
	self := &net.TCPAddr{IP: net.ParseIP("10.0.0.11"), Port: 40000}
	if err := b.admit(self, wire.Hello{Role: wire.RoleBE, Addr: netip.MustParseAddrPort("10.0.0.11:666"), VIP: hello.VIP}); err == nil {
		t.Error("this BE's own address was admitted as a peer")
	}
}

// The watchdog's question: the BE is alive while its control listener's
// accept loop runs.
func TestAlive(t *testing.T) {
	b := &BE{}
	if err := b.Alive(); err != nil {
		t.Fatal(err)
	}
	b.serveEnded.Store(true)
	if err := b.Alive(); err == nil {
		t.Error("a BE whose control listener stopped is alive")
	}
}

// A BE takes a handoff for its FE's HTTP port carrying HTTP and for the
// FE's TLS port carrying a ClientHello, and nothing else: which relay
// serves a connection follows from its first byte.
func TestCheckPort(t *testing.T) {
	fe := wire.Hello{Role: wire.RoleFE, VIP: netip.MustParseAddrPort("10.0.0.100:80"), TLSPort: 443}
	plain := wire.Hello{Role: wire.RoleFE, VIP: netip.MustParseAddrPort("10.0.0.100:80")}
	hello, get := []byte{22, 3, 1, 0, 5}, []byte("GET / HTTP/1.1\r\n\r\n")
	for _, c := range []struct {
		name string
		fe   wire.Hello
		port uint16
		req  []byte
		want wire.Result
	}{
		{"HTTP on the HTTP port", fe, 80, get, wire.ResultOK},
		{"TLS on the TLS port", fe, 443, hello, wire.ResultOK},
		{"TLS on the HTTP port", fe, 80, hello, wire.ResultInvalid},
		{"HTTP on the TLS port", fe, 443, get, wire.ResultInvalid},
		{"another port", fe, 8443, hello, wire.ResultWrongVIP},
		{"TLS port of an FE without one", plain, 443, hello, wire.ResultWrongVIP},
	} {
		ci := &wire.ConnInfo{VIP: netip.AddrPortFrom(c.fe.VIP.Addr(), c.port), RecvQueue: c.req}
		res, err := checkPort(ci, c.fe)
		if res != c.want || (err == nil) != (c.want == wire.ResultOK) {
			t.Errorf("%s: %v %v, want %v", c.name, res, err, c.want)
		}
	}
}

// With accept = be a first request whose wlc rule names this BE and
// another is served here while this BE is not busier than the FE's view
// of the other, and moved there (falling back to the other's web server,
// then this one's) when it is; a frame that changes only the loads
// compiles to the same rules, so the BE updates them in place.
func TestBERouteFirstByLoad(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	frame := func(loads []uint32, pattern string) []byte {
		p, err := wire.Cluster{PHTTP: wire.PHTTPMulti, AcceptBE: true, Policy: "wlc", Loads: loads,
			Servers: []wire.ClusterServer{{Addr: be1, Port: 666, Weight: 1}, {Addr: be2, Port: 666, Weight: 1}},
			Rules:   []wire.ClusterRule{{Targets: []netip.Addr{be1, be2}, Pattern: pattern}}}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	c, err := clusterOf(frame([]uint32{4, 9}, ".*"))
	if err != nil {
		t.Fatal(err)
	}
	b := &BE{cfg: &config.BE{RAddr: be2, RedirectPort: 80}}
	t.Cleanup(b.closeWeb)
	b.cluster.Store(c)
	if r := b.firstIn(c, "", "/", 4); !r.Here {
		t.Errorf("as loaded as be1: %+v, want here", r)
	}
	r := b.firstIn(c, "", "/", 9)
	if r.Here || len(r.Usable) != 2 || r.Usable[0] != b.webPool(be1) || r.Usable[1] != nil || !slices.Equal(r.To, []netip.Addr{be1}) {
		t.Errorf("busier than be1: %+v, want a move to be1, then be1's web server, then this one's", r)
	}
	same, err := clusterOf(frame([]uint32{40, 1}, ".*"))
	if err != nil {
		t.Fatal(err)
	}
	other, _ := clusterOf(frame([]uint32{4, 9}, "/x"))
	noLoads, _ := clusterOf(frame(nil, ".*"))
	if !bytes.Equal(same.rules, c.rules) || bytes.Equal(other.rules, c.rules) || !bytes.Equal(noLoads.rules, c.rules) {
		t.Error("rules compare by the loads, or not by the rules")
	}
}
