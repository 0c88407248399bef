package handover

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"tcpha/admin"
	"tcpha/backends"
	"tcpha/frontend"
	"tcpha/internal/testnet"
	"tcpha/relay"
)

// fakeAgent serves one handover on an admin socket the way a running agent
// does, with the frames serve writes.
func fakeAgent(t *testing.T, serve func(c *net.UnixConn, cmd string)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		line, _ := bufio.NewReader(c).ReadString('\n')
		serve(c.(*net.UnixConn), strings.TrimSpace(line))
	}()
	return path
}

// The frames of an upgrade carry the listeners, the heads and the relayed
// sessions with their sockets, in working order, to the successor.
func TestHandoverFrames(t *testing.T) {
	ctlLn, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ctlLn.Close()
	headClient, headConn := testnet.Pair(t)
	relayClient, relayConn := testnet.Pair(t)
	upServer, upConn := testnet.Pair(t)
	deadline := time.Now().Add(7 * time.Second).Round(time.Millisecond)
	state := relay.State{Body: "length", Remaining: 5, More: true, ClientBuf: []byte("GET /next")}
	sent := make(chan error, 1)
	path := fakeAgent(t, func(c *net.UnixConn, cmd string) {
		if cmd != "upgrade" {
			sent <- errors.New("command " + cmd)
			return
		}
		reg, _ := backends.Registered(netip.MustParseAddrPort("10.0.0.12:666"), 3, []string{`\.jpg$`})
		var released atomic.Bool
		gave, err := Give(c, Roles{
			Listeners:  []Listener{{ListenerControl, ctlLn}},
			Registered: []backends.Registration{reg},
			BE:         func() []relay.Handed { return []relay.Handed{{Client: relayConn, Upstream: upConn, State: state}} },
			FE: func() []frontend.HandedHead {
				return []frontend.HandedHead{{Conn: headConn, Read: []byte("GET / HT"), Deadline: deadline}}
			},
			Release: func() { released.Store(true) },
			Log:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		})
		if err == nil && (!gave || !released.Load()) {
			err = fmt.Errorf("gave %v, released %v", gave, released.Load())
		}
		sent <- err
	})
	in, err := TakeOver(path, true)
	if err != nil {
		t.Fatal(err)
	}
	if in.Control == nil || in.VIP != nil {
		t.Fatalf("listeners: control %v vip %v", in.Control, in.VIP)
	}
	if len(in.Registered) != 1 || in.Registered[0].Server.Weight != 3 || !in.Registered[0].Rules[0].Pattern.MatchString("/a.jpg") {
		t.Errorf("registered: %+v", in.Registered)
	}
	if err := in.Go(); err != nil {
		t.Fatal(err)
	}
	var got []Handed
	released := false
	if err := in.Receive(func(h Handed) { got = append(got, h) }, func() { released = true }); err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if !released || len(got) != 2 {
		t.Fatalf("released %v, got %+v", released, got)
	}
	// The BE's and the FE's connections go in parallel: either may come first.
	var h *frontend.HandedHead
	var r *relay.Handed
	for _, x := range got {
		if x.Head != nil {
			h = x.Head
		}
		if x.Relay != nil {
			r = x.Relay
		}
	}
	if h == nil || r == nil {
		t.Fatalf("got %+v", got)
	}
	if string(h.Read) != "GET / HT" || !h.Deadline.Equal(deadline) {
		t.Errorf("head: %q by %v, want %q by %v", h.Read, h.Deadline, "GET / HT", deadline)
	}
	if r.State.Body != "length" || r.State.Remaining != 5 || !r.State.More || string(r.State.ClientBuf) != "GET /next" {
		t.Errorf("relay state %+v", r.State)
	}
	// The sockets work from here; this process's copies went with Send.
	check := func(name string, from net.Conn, to *net.TCPConn) {
		t.Helper()
		io.WriteString(from, name)
		to.SetReadDeadline(time.Now().Add(2 * time.Second))
		b := make([]byte, len(name))
		if _, err := io.ReadFull(to, b); err != nil || string(b) != name {
			t.Errorf("%s: %q %v", name, b, err)
		}
	}
	check("head", headClient, h.Conn)
	check("client", relayClient, r.Client)
	check("upstream", upServer, r.Upstream)
	go net.Dial("tcp4", ctlLn.Addr().String())
	in.Control.(*net.TCPListener).SetDeadline(time.Now().Add(2 * time.Second))
	if c, err := in.Control.Accept(); err != nil {
		t.Errorf("the inherited listener: %v", err)
	} else {
		c.Close()
	}
	in.CloseListeners()
}

// A plain start takes over only from an agent that agrees, and finds no
// agent where nobody answers; -upgrade needs one.
func TestTakeOverRefusedOrAbsent(t *testing.T) {
	path := fakeAgent(t, func(c *net.UnixConn, cmd string) {
		Refuse(c, "not asked to quit")
	})
	if _, err := TakeOver(path, false); !errors.Is(err, admin.ErrAgentRunning) || !strings.Contains(err.Error(), "not asked to quit") {
		t.Errorf("refused: %v", err)
	}
	none := filepath.Join(t.TempDir(), "none.sock")
	if in, err := TakeOver(none, false); in != nil || err != nil {
		t.Errorf("no agent, plain start: %v %v", in, err)
	}
	if _, err := TakeOver(none, true); err == nil || !strings.Contains(err.Error(), "no running agent") {
		t.Errorf("no agent, -upgrade: %v", err)
	}
}

// The frames' kinds and listener names travel as the names agents of
// earlier versions wrote, so that an upgrade works across versions; an
// unknown kind is refused, never taken for another.
func TestFrameWire(t *testing.T) {
	b, err := json.Marshal(frame{Kind: KindStart, Listeners: []ListenerName{ListenerVIP, ListenerRegister}})
	if err != nil || string(b) != `{"kind":"start","listeners":["vip","register"]}` {
		t.Errorf("start frame: %s %v", b, err)
	}
	for k := KindStart; k <= KindRefused; k++ {
		var back frame
		b, err := json.Marshal(frame{Kind: k})
		if err != nil || json.Unmarshal(b, &back) != nil || back.Kind != k {
			t.Errorf("%v: %s %v, back %v", k, b, err, back.Kind)
		}
	}
	var f frame
	if err := json.Unmarshal([]byte(`{"kind":"restart"}`), &f); err == nil {
		t.Errorf("unknown kind read as %v", f.Kind)
	}
	if _, err := json.Marshal(frame{}); err == nil {
		t.Error("a frame without a kind was written")
	}
}
