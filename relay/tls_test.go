package relay

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"tcpha/handoff/conntab"
	"tcpha/internal/testnet"
)

// tlsPipeRig is a relayed TLS connection: the test holds the client's end
// and the web server's end (which the relay dialed), and the relay pipes
// between them, as ServeTLS does for a handed-off connection.
func tlsPipeRig(t *testing.T, r *Relay) (client, server *net.TCPConn) {
	t.Helper()
	client, relayClient := testnet.Pair(t)
	relayUp, server := testnet.Pair(t)
	// Small buffers: loopback's autotuned ones would take a whole test
	// stream at once, and the relay would be done before any handover.
	for _, c := range []*net.TCPConn{client, server} {
		c.SetReadBuffer(64 << 10)
	}
	for _, c := range []*net.TCPConn{relayClient, relayUp} {
		c.SetWriteBuffer(64 << 10)
	}
	r.ServeTLS(relayClient, &TLSUpstream{Conn: relayUp})
	client.SetDeadline(time.Now().Add(20 * time.Second))
	server.SetDeadline(time.Now().Add(20 * time.Second))
	return client, server
}

// A TLS connection's raw relay moves to the successor in the middle of a
// stream each way (an agent upgrade on the BE, issue 16): every byte
// arrives once and in order, and the half-closes after it pass on. Before,
// ServeTLS's pipe was not part of the handover: it stayed in the old
// process and ended with it.
func TestHandoverTLSPipe(t *testing.T) {
	w := newWebServer(t)
	a := newRelay(t, w.addr)
	client, server := tlsPipeRig(t, a)
	down, up := make([]byte, 4<<20), make([]byte, 4<<20)
	rand.Read(down)
	rand.Read(up)
	// Each side writes its stream, then half-closes, and reads the other's
	// slowly, so that both are in flight when the handover comes.
	type got struct {
		b   []byte
		err error
	}
	atClient, atServer := make(chan got, 1), make(chan got, 1)
	for _, e := range []struct {
		c    *net.TCPConn
		send []byte
		into chan got
	}{{client, up, atClient}, {server, down, atServer}} {
		go func() {
			e.c.Write(e.send)
			e.c.CloseWrite()
		}()
		go func() { b, err := slowRead(e.c, 20<<20); e.into <- got{b, err} }()
	}
	time.Sleep(50 * time.Millisecond)
	b, handed := handOver(t, a, w.addr)
	if len(handed) != 1 || handed[0].State.Body != BodyTLS || handed[0].Upstream == nil {
		t.Fatalf("handed %+v, want the TLS connection with its upstream", handed)
	}
	a.Wait() // the old relay lets go: nothing of it runs on
	for name, x := range map[string]struct {
		got  got
		want []byte
	}{"client": {<-atClient, down}, "server": {<-atServer, up}} {
		if x.got.err != nil || !bytes.Equal(x.got.b, x.want) {
			t.Errorf("the %s read %d bytes (%v), want the %d sent, equal %v", name, len(x.got.b), x.got.err, len(x.want), bytes.Equal(x.got.b, x.want))
		}
	}
	// Both ways closed: the successor's relay ends and closes its sockets.
	done := make(chan struct{})
	go func() { b.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Error("the successor's TLS relay did not end after both half-closes")
	}
}

// A TLS connection with one way already closed (the client sent all and
// half-closed) is handed over as it stands: the server's stream goes on,
// and the upstream connection is not half-closed twice into a reset.
func TestHandoverTLSPipeHalfClosed(t *testing.T) {
	w := newWebServer(t)
	a := newRelay(t, w.addr)
	client, server := tlsPipeRig(t, a)
	client.Write([]byte("hello"))
	client.CloseWrite()
	if b, err := io.ReadAll(server); err != nil || string(b) != "hello" {
		t.Fatalf("the server read %q %v before the handover", b, err)
	}
	down := make([]byte, 4<<20)
	rand.Read(down)
	go func() {
		server.Write(down)
		server.CloseWrite()
	}()
	got := make(chan []byte, 1)
	go func() { b, _ := slowRead(client, 20<<20); got <- b }()
	time.Sleep(50 * time.Millisecond)
	b, handed := handOver(t, a, w.addr)
	if len(handed) != 1 || handed[0].State.Body != BodyTLS {
		t.Fatalf("handed %+v", handed)
	}
	if x := <-got; !bytes.Equal(x, down) {
		t.Errorf("the client read %d bytes, want the %d sent, equal %v", len(x), len(down), bytes.Equal(x, down))
	}
	b.Wait()
}

// Without a handover, a deadline is not a pause: the pipe ends both
// connections as on any other error, and nothing is handed.
func TestTLSPipeDeadlineWithoutHandover(t *testing.T) {
	w := newWebServer(t)
	a := newRelay(t, w.addr)
	a.handed = make(chan Handed, 1)
	client, server := tlsPipeRig(t, a)
	a.mu.Lock()
	for p := range a.pipes {
		p.client.SetReadDeadline(time.Unix(1, 0))
	}
	a.mu.Unlock()
	a.Wait()
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Error("the client's connection is still open")
	}
	if _, err := server.Read(make([]byte, 1)); err == nil {
		t.Error("the server's connection is still open")
	}
	if len(a.handed) != 0 {
		t.Error("a TLS connection was handed without a handover")
	}
}

// A TLS connection is listed by Conns (tcphactl conns on a BE) and reset
// by Reset, which an FE whose drain ran out asks for so that neither end
// hangs once it stops forwarding. Before, both looked at HTTP sessions
// only: a TLS client was not listed, and "no such connection" was the
// answer to its reset.
func TestTLSPipeConnsAndReset(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	client, server := tlsPipeRig(t, r)
	addr := netip.MustParseAddrPort(client.LocalAddr().String())
	if conns := r.Conns(); len(conns) != 1 || conns[0].Client != addr || !conns[0].Busy || conns[0].State != conntab.Established {
		t.Fatalf("Conns: %+v, want the TLS connection of %v", conns, addr)
	}
	if !r.Reset(addr) {
		t.Fatal("Reset did not find the TLS connection")
	}
	if _, err := client.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the client read %v, want a reset", err)
	}
	if _, err := server.Read(make([]byte, 1)); err == nil {
		t.Error("the web server's connection is still open")
	}
	r.Wait()
	if conns := r.Conns(); len(conns) != 0 {
		t.Errorf("Conns after the reset: %+v", conns)
	}
}
