package handoff

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"tcpha/backends"
	"tcpha/handoff/wire"
)

// fakeRebuilder stands in for TCP_REPAIR: Restore hands out the server end
// of a loopback connection whose client end the test holds, and writes the
// handed-off request into it as the kernel's receive queue would hold it.
type fakeRebuilder struct {
	mu       sync.Mutex
	clients  chan net.Conn
	fail     error
	restored []*wire.ConnInfo
	dropped  int
}

func (f *fakeRebuilder) Restore(ci *wire.ConnInfo) (*net.TCPConn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return nil, f.fail
	}
	f.restored = append(f.restored, ci)
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	cl, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		return nil, err
	}
	srv, err := ln.Accept()
	if err != nil {
		return nil, err
	}
	cl.Write(ci.RecvQueue) // what the client had sent
	f.clients <- cl
	return srv.(*net.TCPConn), nil
}

func (f *fakeRebuilder) CloseSilently(c *net.TCPConn) error {
	f.mu.Lock()
	f.dropped++
	f.mu.Unlock()
	return c.Close()
}

// upstream is a one-shot web server: it answers each connection's first
// request with "served:" and the request's first line.
func upstream(t *testing.T) (func(context.Context) (*net.TCPConn, error), func()) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b := make([]byte, 1024)
				n, _ := c.Read(b)
				line, _, _ := bytes.Cut(b[:n], []byte("\r\n"))
				c.Write(append([]byte("served:"), line...))
			}()
		}
	}()
	dial := func(ctx context.Context) (*net.TCPConn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp4", ln.Addr().String())
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
	return dial, func() { ln.Close() }
}

type rig struct {
	client   *Client
	be       netip.AddrPort
	rb       *fakeRebuilder
	receiver *Receiver
}

func newRig(t *testing.T, clientSecret, beSecret string, commitTimeout time.Duration) *rig {
	t.Helper()
	dial, stopUp := upstream(t)
	rb := &fakeRebuilder{clients: make(chan net.Conn, 10)}
	r := &Receiver{
		Codec: wire.Codec{Secret: []byte(beSecret)}, VIP: netip.MustParseAddr("10.0.0.100"),
		Rebuilder: rb, Upstream: dial, CommitTimeout: commitTimeout, MaxClients: 1, Log: quiet(),
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Serve(ctx, ln); close(done) }()
	pool := backends.NewPool(func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp4", a.String())
	}, 2)
	t.Cleanup(func() { cancel(); <-done; pool.Close(); stopUp() })
	return &rig{
		client:   &Client{Pool: pool, Codec: wire.Codec{Secret: []byte(clientSecret)}},
		be:       netip.MustParseAddrPort(ln.Addr().String()),
		rb:       rb,
		receiver: r,
	}
}

func connInfo(vip string) *wire.ConnInfo {
	return &wire.ConnInfo{
		Client: netip.MustParseAddrPort("10.0.0.10:40000"), VIP: netip.MustParseAddrPort(vip),
		MSS: 1460, RcvSeq: 100, RecvQueue: []byte("GET /a.jpg HTTP/1.1\r\n\r\n"),
	}
}

func TestOfferCommitRelays(t *testing.T) {
	r := newRig(t, "k", "k", 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	o, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.100:80"))
	if err != nil {
		t.Fatal(err)
	}
	cl := <-r.rb.clients
	// Nothing is served before the commit.
	cl.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _ := cl.Read(make([]byte, 1)); n != 0 {
		t.Fatal("BE served before the FE committed")
	}
	if err := o.Commit(); err != nil {
		t.Fatal(err)
	}
	cl.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, _ := io.ReadAll(cl)
	if string(got) != "served:GET /a.jpg HTTP/1.1" {
		t.Errorf("client got %q", got)
	}
	cl.Close() // the client's FIN ends the relay's other direction
	r.receiver.Wait()
	if s := r.receiver.Stats(); s.Served != 1 || s.Active != 0 {
		t.Errorf("stats %+v", s)
	}
	// The control connection went back to the pool and serves a ping.
	if err := r.client.Ping(ctx, r.be); err != nil {
		t.Errorf("ping: %v", err)
	}
}

func TestOfferRefusals(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	r := newRig(t, "", "", time.Second)
	var refused *RefusedError
	if _, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.99:80")); !errors.As(err, &refused) || refused.Ack.Result != wire.ResultWrongVIP {
		t.Errorf("wrong VIP: %v", err)
	}
	r.rb.fail = errors.New("connect: cannot assign requested address")
	if _, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.100:80")); !errors.As(err, &refused) || refused.Ack.Result != wire.ResultRestore {
		t.Errorf("restore failure: %v", err)
	}
	if s := r.receiver.Stats(); s.Refused != 2 {
		t.Errorf("refused = %d", s.Refused)
	}

	// Secrets that differ: the BE drops the frame and the connection.
	r2 := newRig(t, "one", "other", time.Second)
	if _, err := r2.client.Offer(ctx, r2.be, connInfo("10.0.0.100:80")); err == nil || errors.As(err, &refused) {
		t.Errorf("bad MAC: err = %v, want a transport error", err)
	}
	if len(r2.rb.restored) != 0 {
		t.Error("a frame with a bad MAC was acted on")
	}
}

// A restored connection whose commit never comes is dropped silently.
func TestNoCommit(t *testing.T) {
	r := newRig(t, "", "", 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.100:80")); err != nil {
		t.Fatal(err)
	}
	cl := <-r.rb.clients
	cl.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, _ := cl.Read(make([]byte, 1)); n != 0 {
		t.Error("served without commit")
	}
	r.rb.mu.Lock()
	defer r.rb.mu.Unlock()
	if r.rb.dropped != 1 {
		t.Errorf("dropped = %d, want 1", r.rb.dropped)
	}
}

// An unreachable BE is an error quickly, not a hang.
func TestOfferUnreachable(t *testing.T) {
	ln, _ := net.Listen("tcp4", "127.0.0.1:0")
	addr := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	c := &Client{Pool: backends.NewPool(func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp4", a.String())
	}, 1)}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := c.Offer(ctx, addr, connInfo("10.0.0.100:80")); err == nil {
		t.Fatal("no error")
	}
	if time.Since(start) > time.Second {
		t.Errorf("took %v", time.Since(start))
	}
}
