package agent

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tcpha/admin"
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
		f, _ := ctlLn.(*net.TCPListener).File()
		if err := sendFrame(c, handoverFrame{Kind: "start", Listeners: []string{"control"}}, []*os.File{f}); err != nil {
			sent <- err
			return
		}
		f.Close()
		line, _ := bufio.NewReader(c).ReadString('\n')
		if line != "go\n" {
			sent <- errors.New("no go: " + line)
			return
		}
		out := &sender{c: c}
		err := out.send([]handed{
			{head: &frontend.HandedHead{Conn: headConn, Read: []byte("GET / HT"), Deadline: deadline}},
			{relay: &relay.Handed{Client: relayConn, Upstream: upConn, State: state}},
		})
		if err == nil {
			err = out.frame(handoverFrame{Kind: "released"}, nil)
		}
		if err == nil {
			err = out.frame(handoverFrame{Kind: "done"}, nil)
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
	if err := in.Go(); err != nil {
		t.Fatal(err)
	}
	var got []handed
	released := false
	if err := in.Receive(func(h handed) { got = append(got, h) }, func() { released = true }); err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if !released || len(got) != 2 || got[0].head == nil || got[1].relay == nil {
		t.Fatalf("released %v, got %+v", released, got)
	}
	h, r := got[0].head, got[1].relay
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
	in.closeListeners()
}

// A plain start takes over only from an agent that agrees, and finds no
// agent where nobody answers; -upgrade needs one.
func TestTakeOverRefusedOrAbsent(t *testing.T) {
	path := fakeAgent(t, func(c *net.UnixConn, cmd string) {
		sendFrame(c, handoverFrame{Kind: "refused", Reason: "not asked to quit"}, nil)
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
