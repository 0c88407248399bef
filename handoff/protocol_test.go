package handoff

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
)

// fakeRebuilder stands in for TCP_REPAIR: a rebuilt socket is the server end
// of a loopback connection whose client end the test receives once the
// socket is activated, with the handed-off request waiting in it as the
// kernel's receive queue would hold it.
type fakeRebuilder struct {
	mu        sync.Mutex
	clients   chan net.Conn
	fail      error
	rebuilt   []*wire.ConnInfo
	discarded int
}

type fakeRebuilt struct {
	f  *fakeRebuilder
	ci *wire.ConnInfo
}

func (f *fakeRebuilder) Rebuild(ci *wire.ConnInfo) (Rebuilt, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return nil, f.fail
	}
	f.rebuilt = append(f.rebuilt, ci)
	return &fakeRebuilt{f, ci}, nil
}

func (r *fakeRebuilt) Activate() (*net.TCPConn, error) {
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
	cl.Write(r.ci.RecvQueue) // what the client had sent
	r.f.clients <- cl
	return srv.(*net.TCPConn), nil
}

func (r *fakeRebuilt) Discard() {
	r.f.mu.Lock()
	r.f.discarded++
	r.f.mu.Unlock()
}

// webServer answers each connection's first request with "served:" and the
// request's first line.
func webServer(t *testing.T) func(context.Context, *wire.ConnInfo) (Upstream, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
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
	return func(ctx context.Context, _ *wire.ConnInfo) (Upstream, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp4", ln.Addr().String())
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}
}

// relays runs committed connections as the BE does, and lets the test wait
// for them.
type relays struct {
	mu   sync.Mutex
	done []chan struct{}
}

func (rs *relays) run(client *net.TCPConn, up Upstream) {
	d := make(chan struct{})
	rs.mu.Lock()
	rs.done = append(rs.done, d)
	rs.mu.Unlock()
	go func() {
		defer close(d)
		u := up.(*net.TCPConn)
		go io.Copy(u, client)
		io.Copy(client, u)
		client.Close()
		u.Close()
	}()
}

func (rs *relays) Wait() {
	rs.mu.Lock()
	done := rs.done
	rs.mu.Unlock()
	for _, d := range done {
		<-d
	}
}

type rig struct {
	client   *Client
	be       netip.AddrPort
	rb       *fakeRebuilder
	receiver *Receiver
	relays   *relays
}

var vip = netip.MustParseAddrPort("10.0.0.100:80")

func newRig(t *testing.T, feSecret, beSecret string, commitTimeout time.Duration) *rig {
	t.Helper()
	rb := &fakeRebuilder{clients: make(chan net.Conn, 10)}
	relays := &relays{}
	r := &Receiver{
		VIP: vip.Addr(), Rebuilder: rb, Connect: webServer(t), Run: relays.run,
		CommitTimeout: commitTimeout, MaxPending: 4, Log: quiet(),
		Check: func(ci *wire.ConnInfo, s *ctl.Session) (wire.Result, error) {
			return wire.ResultOK, CheckClient(ci, vip.Addr(), nil)
		},
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	bytesOf := func(s string) []byte {
		if s == "" {
			return nil
		}
		return []byte(s)
	}
	sv := &ctl.Server{Config: &ctl.Config{
		Secret: bytesOf(beSecret), Local: wire.Hello{Role: wire.RoleBE, Addr: netip.MustParseAddrPort(ln.Addr().String())},
		Handler: r, Log: quiet(),
	}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { sv.Serve(ctx, ln); close(done) }()
	be := netip.MustParseAddrPort(ln.Addr().String())
	pool := ctl.NewPool(&ctl.Config{
		Secret: bytesOf(feSecret), Local: wire.Hello{Role: wire.RoleFE, VIP: vip, TLSPort: tlsPort}, Log: quiet(),
	}, func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "tcp4", a.String())
	}, 2)
	pool.Add(be)
	t.Cleanup(func() { pool.Close(); cancel(); <-done; r.Wait(); relays.Wait() })
	if feSecret == beSecret {
		deadline := time.Now().Add(5 * time.Second)
		for len(pool.Sessions(be)) < 2 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
	}
	return &rig{client: &Client{Pool: pool}, be: be, rb: rb, receiver: r, relays: relays}
}

func connInfo(client string, vipPort string) *wire.ConnInfo {
	return &wire.ConnInfo{
		Client: netip.MustParseAddrPort(client), VIP: netip.MustParseAddrPort(vipPort),
		MSS: 1460, RcvSeq: 100, RecvQueue: []byte("GET /a.jpg HTTP/1.1\r\n\r\n"),
	}
}

func TestOfferCommitRelays(t *testing.T) {
	r := newRig(t, "k", "k", 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	o, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:40000", "10.0.0.100:80"))
	if err != nil {
		t.Fatal(err)
	}
	// Nothing is activated, so nothing is served, before the commit.
	select {
	case <-r.rb.clients:
		t.Fatal("the BE activated the socket before the FE committed")
	case <-time.After(100 * time.Millisecond):
	}
	if err := o.Commit(); err != nil {
		t.Fatal(err)
	}
	cl := <-r.rb.clients
	cl.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, _ := io.ReadAll(cl)
	if string(got) != "served:GET /a.jpg HTTP/1.1" {
		t.Errorf("client got %q", got)
	}
	cl.Close()
	r.relays.Wait()
	if s := r.receiver.Stats(); s.Served != 1 || s.Pending != 0 {
		t.Errorf("stats %+v", s)
	}
	if h, err := r.client.Probe(ctx, r.be, nil); err != nil {
		t.Errorf("probe: %+v %v", h, err)
	}
}

// Many handoffs in flight on a few sessions, all committed.
func TestConcurrentHandoffs(t *testing.T) {
	r := newRig(t, "k", "k", 5*time.Second)
	r.receiver.MaxPending = 1000
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for i := range 100 {
		wg.Go(func() {
			ci := connInfo(netip.AddrPortFrom(netip.MustParseAddr("10.0.0.10"), uint16(20000+i)).String(), "10.0.0.100:80")
			o, err := r.client.Offer(ctx, r.be, ci)
			if err != nil {
				errs <- err
				return
			}
			if err := o.Commit(); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for range 100 {
		cl := <-r.rb.clients
		cl.SetReadDeadline(time.Now().Add(5 * time.Second))
		if got, _ := io.ReadAll(cl); string(got) != "served:GET /a.jpg HTTP/1.1" {
			t.Errorf("client got %q", got)
		}
		cl.Close()
	}
	r.relays.Wait()
}

func TestOfferRefusals(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r := newRig(t, "", "", time.Second)
	for _, tc := range []struct {
		ci   *wire.ConnInfo
		want wire.Result
	}{
		{connInfo("10.0.0.10:40000", "10.0.0.99:80"), wire.ResultWrongVIP},
		{connInfo("127.0.0.1:80", "10.0.0.100:80"), wire.ResultInvalid},
		{connInfo("10.0.0.100:5", "10.0.0.100:80"), wire.ResultInvalid},
	} {
		if _, err := r.client.Offer(ctx, r.be, tc.ci); !refusedWith(err, tc.want) {
			t.Errorf("client %v VIP %v: %v, want %v", tc.ci.Client, tc.ci.VIP, err, tc.want)
		}
	}
	r.rb.fail = errors.New("connect: cannot assign requested address")
	if _, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:40000", "10.0.0.100:80")); !refusedWith(err, wire.ResultRestore) {
		t.Errorf("restore failure: %v", err)
	}
	r.rb.fail = nil
	r.receiver.Drain()
	if _, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:40000", "10.0.0.100:80")); !refusedWith(err, wire.ResultDraining) {
		t.Errorf("draining: %v", err)
	}
	if s := r.receiver.Stats(); s.Refused != 5 {
		t.Errorf("refused = %d", s.Refused)
	}
	if len(r.rb.rebuilt) != 0 {
		t.Errorf("refused offers rebuilt %d sockets", len(r.rb.rebuilt))
	}

	// Secrets that differ: no session, so nothing is offered at all.
	r2 := newRig(t, "one", "other", time.Second)
	if _, err := r2.client.Offer(ctx, r2.be, connInfo("10.0.0.10:40000", "10.0.0.100:80")); err == nil || IsRefusal(err) {
		t.Errorf("bad secret: err = %v, want no session", err)
	}
}

func refusedWith(err error, want wire.Result) bool {
	var r *RefusedError
	return errors.As(err, &r) && r.Ack.Result == want
}

// maxclients bounds handoffs in progress: past it, offers are refused busy,
// and a committed one frees its slot.
func TestMaxPending(t *testing.T) {
	r := newRig(t, "", "", 5*time.Second)
	r.receiver.MaxPending = 2
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	o1, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:1", "10.0.0.100:80"))
	if err != nil {
		t.Fatal(err)
	}
	o2, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:2", "10.0.0.100:80"))
	if err != nil {
		t.Fatal(err)
	}

	if _, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:3", "10.0.0.100:80")); !refusedWith(err, wire.ResultBusy) {
		t.Errorf("third offer: %v, want busy", err)
	}
	o1.Commit()
	cl := <-r.rb.clients
	defer cl.Close()
	deadline := time.Now().Add(2 * time.Second)
	for r.receiver.Stats().Pending != 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	o4, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:4", "10.0.0.100:80"))
	if err != nil {
		t.Fatalf("after a commit freed a slot: %v", err)
	}
	o2.Abort()
	o4.Abort()
	for r.receiver.Stats().Pending != 0 && time.Now().Before(deadline.Add(2*time.Second)) {
		time.Sleep(5 * time.Millisecond)
	}
	if p := r.receiver.Stats().Pending; p != 0 {
		t.Errorf("%d handoffs still pending after their aborts", p)
	}
}

// A rebuilt connection whose commit never comes is discarded silently, and
// one the FE aborts at once.
func TestNoCommitAndAbort(t *testing.T) {
	r := newRig(t, "", "", 200*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:40000", "10.0.0.100:80")); err != nil {
		t.Fatal(err)
	}
	o, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:40001", "10.0.0.100:80"))
	if err != nil {
		t.Fatal(err)
	}
	o.Abort()
	time.Sleep(500 * time.Millisecond)
	select {
	case <-r.rb.clients:
		t.Error("a socket was activated without a commit")
	default:
	}
	r.rb.mu.Lock()
	defer r.rb.mu.Unlock()
	if r.rb.discarded != 2 {
		t.Errorf("discarded = %d, want 2", r.rb.discarded)
	}
	if s := r.receiver.Stats(); s.Pending != 0 {
		t.Errorf("pending %d", s.Pending)
	}
}

// A second offer of the same flow from the same FE (its session failed
// before the ACK) replaces the first, whose socket is discarded first.
func TestReofferReplaces(t *testing.T) {
	r := newRig(t, "", "", 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ci := connInfo("10.0.0.10:40000", "10.0.0.100:80")
	if _, err := r.client.Offer(ctx, r.be, ci); err != nil {
		t.Fatal(err)
	}
	o, err := r.client.Offer(ctx, r.be, ci)
	if err != nil {
		t.Fatal(err)
	}
	r.rb.mu.Lock()
	discarded := r.rb.discarded
	r.rb.mu.Unlock()
	if discarded != 1 {
		t.Errorf("discarded %d before the second rebuild, want 1", discarded)
	}
	o.Commit()
	cl := <-r.rb.clients
	cl.Close()
}

// An unreachable BE is an error at once, not a dial on the handoff's path.
func TestOfferUnreachable(t *testing.T) {
	ln, _ := net.Listen("tcp4", "127.0.0.1:0")
	addr := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	pool := ctl.NewPool(&ctl.Config{Local: wire.Hello{Role: wire.RoleFE}, Log: quiet()},
		func(ctx context.Context, a netip.AddrPort) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp4", a.String())
		}, 1)
	defer pool.Close()
	pool.Add(addr)
	c := &Client{Pool: pool}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := c.Offer(ctx, addr, connInfo("10.0.0.10:40000", "10.0.0.100:80")); !errors.Is(err, ctl.ErrNoSession) {
		t.Fatalf("err = %v, want ErrNoSession", err)
	}
	if time.Since(start) > 50*time.Millisecond {
		t.Errorf("took %v", time.Since(start))
	}
}

// A stopping FE's reset reaches the BE's Reset hook with the client's
// flow; one the BE does not serve is answered as unknown.
func TestReset(t *testing.T) {
	r := newRig(t, "k", "k", 5*time.Second)
	served := netip.MustParseAddrPort("10.0.0.10:40000")
	var got []netip.AddrPort
	var mu sync.Mutex
	r.receiver.Reset = func(c netip.AddrPort) bool {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, c)
		return c == served
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.client.Reset(ctx, r.be, served); err != nil {
		t.Errorf("reset of a served connection: %v", err)
	}
	err := r.client.Reset(ctx, r.be, netip.MustParseAddrPort("10.0.0.10:40001"))
	if err == nil || !strings.Contains(err.Error(), "no such connection") {
		t.Errorf("reset of an unknown connection: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 || got[0] != served {
		t.Errorf("Reset hook saw %v", got)
	}
}

// fakeDelivery is an Upstream that takes the connection itself (deliver =
// socket): it stages before the ACK, commits on Activate (no connection
// for Run) and aborts on Discard.
type fakeDelivery struct {
	mu                        sync.Mutex
	staged, committed, closed int
	aborted                   int
}

func (d *fakeDelivery) Close() error { d.mu.Lock(); d.closed++; d.mu.Unlock(); return nil }

func (d *fakeDelivery) Deliver(ci *wire.ConnInfo, _ Rebuilder) (Rebuilt, error) {
	d.mu.Lock()
	d.staged++
	d.mu.Unlock()
	return deliveredRebuilt{d}, nil
}

type deliveredRebuilt struct{ d *fakeDelivery }

func (r deliveredRebuilt) Activate() (*net.TCPConn, error) {
	r.d.mu.Lock()
	r.d.committed++
	r.d.mu.Unlock()
	return nil, nil
}

func (r deliveredRebuilt) Discard() { r.d.mu.Lock(); r.d.aborted++; r.d.mu.Unlock() }

// An Upstream that is a Deliverer rebuilds the connection itself: the
// Rebuilder is not asked, the delivery is staged before the ACK and
// committed at the commit, or aborted; Run hears of a committed one with
// its Upstream.
func TestOfferDeliverer(t *testing.T) {
	r := newRig(t, "k", "k", 5*time.Second)
	d := &fakeDelivery{}
	r.receiver.Connect = func(context.Context, *wire.ConnInfo) (Upstream, error) { return d, nil }
	ran := make(chan Upstream, 2)
	r.receiver.Run = func(c *net.TCPConn, up Upstream) {
		if c != nil {
			t.Errorf("Run got a connection for a delivered one")
		}
		ran <- up
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	o, err := r.client.Offer(ctx, r.be, connInfo("10.0.0.10:40000", "10.0.0.100:80"))
	if err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	staged, committed := d.staged, d.committed
	d.mu.Unlock()
	if staged != 1 || committed != 0 {
		t.Fatalf("after the ACK: staged %d, committed %d; want 1, 0", staged, committed)
	}
	if err := o.Commit(); err != nil {
		t.Fatal(err)
	}
	if up := <-ran; up != Upstream(d) {
		t.Errorf("Run got %v", up)
	}
	o, err = r.client.Offer(ctx, r.be, connInfo("10.0.0.10:40001", "10.0.0.100:80"))
	if err != nil {
		t.Fatal(err)
	}
	o.Abort()
	deadline := time.Now().Add(5 * time.Second)
	for {
		d.mu.Lock()
		aborted, closed := d.aborted, d.closed
		d.mu.Unlock()
		if aborted == 1 && closed == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the abort: aborted %d, closed %d; want 1, 1", aborted, closed)
		}
		time.Sleep(5 * time.Millisecond)
	}
	r.rb.mu.Lock()
	defer r.rb.mu.Unlock()
	if len(r.rb.rebuilt) != 0 {
		t.Errorf("the Rebuilder rebuilt %d connections of a Deliverer", len(r.rb.rebuilt))
	}
}
