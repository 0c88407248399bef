package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"tcpha/config"
	"tcpha/handoff"
	"tcpha/handoff/ctl"
	"tcpha/handoff/repair"
	"tcpha/handoff/wire"
	"tcpha/metrics"
	"tcpha/netif"
	"tcpha/nft"
	"tcpha/relay"
)

// be is a back end: it rebuilds handed-off connections and relays them to
// the unmodified local web server, which answers the client directly.
type be struct {
	cfg *config.BE
	log *slog.Logger
	installed
	ln     net.Listener
	server *ctl.Server
	recv   *handoff.Receiver
	pool   *relay.Pool
	relay  *relay.Relay
	local  *localAddrs
}

// startBE starts the back end; ln, when not nil, is its control listener,
// inherited from a predecessor.
func startBE(ctx context.Context, cfg *config.BE, secret []byte, m *metrics.Metrics, log *slog.Logger, ln net.Listener) (*be, error) {
	b := &be{cfg: cfg, log: log.With("role", "be")}
	ok := false
	defer func() {
		if !ok {
			b.stop()
		}
	}()
	var err error
	if b.nftc, err = openNFT(); err != nil {
		return nil, fmt.Errorf("be: %w", err)
	}
	// ARP filtering first: with the VIP on loopback and no filter the BE
	// would answer ARP for it and steal the cluster's traffic (seed 4.4).
	b.rs = nft.BE(nft.BEParams{VIP: cfg.VAddr, UAddr: cfg.UAddr})
	if err := nft.Apply(b.nftc, b.rs); err != nil {
		return nil, fmt.Errorf("be: %w", err)
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("be: find loopback: %w", err)
	}
	if b.vip, err = addVIP(lo, cfg.VAddr); err != nil {
		return nil, fmt.Errorf("be: %w", err)
	}
	if b.local, err = newLocalAddrs(); err != nil {
		return nil, fmt.Errorf("be: %w", err)
	}
	ctlAddr := netip.AddrPortFrom(cfg.RAddr, cfg.Port)
	if b.ln = ln; ln == nil {
		if b.ln, err = (&net.ListenConfig{}).Listen(ctx, "tcp4", ctlAddr.String()); err != nil {
			return nil, fmt.Errorf("be: listen for handoffs on %v: %w", ctlAddr, err)
		}
	}
	up := cfg.Redirect()
	dialer := &net.Dialer{}
	b.pool = &relay.Pool{Dial: func(ctx context.Context) (*net.TCPConn, error) {
		c, err := dialer.DialContext(ctx, "tcp4", up.String())
		if err != nil {
			return nil, err
		}
		return c.(*net.TCPConn), nil
	}}
	b.relay = relay.New(relay.Config{
		Pool: b.pool, MaxHeader: cfg.MaxHeader, HeadTimeout: cfg.RequestTimeout,
		IdleTimeout: cfg.KeepAliveTimeout, Log: b.log,
	})
	b.recv = &handoff.Receiver{
		VIP: cfg.VAddr, Check: b.check, Rebuilder: rebuilder{log: b.log},
		// An idle keep-alive connection to the web server if there is one;
		// a new one fails fast when the server is down.
		Connect: func(ctx context.Context) (handoff.Upstream, error) { return b.pool.Get(ctx) },
		Run: func(client *net.TCPConn, up handoff.Upstream) {
			b.relay.Serve(client, up.(*relay.Upstream))
		},
		CommitTimeout: cfg.CommitTimeout, MaxPending: cfg.MaxClients, Log: b.log,
		Observe: func(r wire.Result) { m.Offers.WithLabelValues(r.String()).Inc() },
	}
	members := map[netip.Addr]bool{}
	for _, a := range cfg.FEAddrs {
		members[a] = true
	}
	b.server = &ctl.Server{
		Config: &ctl.Config{
			Secret:  secret,
			Local:   wire.Hello{Role: wire.RoleBE, Addr: ctlAddr, VIP: netip.AddrPortFrom(cfg.VAddr, 0)},
			Handler: b.recv,
			Health: func() wire.Health {
				return wire.Health{ServerUp: true, Active: uint32(b.relay.Active())}
			},
			Log: b.log,
		},
		Member: func(a netip.Addr) bool { return members[a] },
		Admit:  b.admit,
	}
	ok = true
	b.log.Info("back end ready", "op", "start", "vip", cfg.VAddr.String(), "handoff_port", cfg.Port,
		"upstream", up.String(), "uaddr", cfg.UAddr.String(), "fe", fmt.Sprint(cfg.FEAddrs), "authenticated", len(secret) > 0)
	return b, nil
}

// admit takes a session only from an FE that serves this BE's VIP and says
// so from its own address.
func (b *be) admit(remote net.Addr, h wire.Hello) error {
	src := addrOf(remote)
	switch {
	case h.Role != wire.RoleFE:
		return fmt.Errorf("a %v may not open sessions to this BE", h.Role)
	case h.Addr.Addr() != src && !h.Addr.Addr().IsUnspecified():
		return fmt.Errorf("hello claims %v but comes from %v", h.Addr.Addr(), src)
	case h.VIP.Addr() != b.cfg.VAddr:
		return fmt.Errorf("the FE serves VIP %v, this BE serves %v", h.VIP.Addr(), b.cfg.VAddr)
	case h.VIP.Port() == 0:
		return errors.New("the FE names no VIP port")
	}
	return nil
}

// check validates an offer beyond its VIP: it must be for the port its FE
// serves, from a client that can be one, with nothing to send yet.
func (b *be) check(ci *wire.ConnInfo, from *ctl.Session) (wire.Result, error) {
	if port := from.Peer.VIP.Port(); ci.VIP.Port() != port {
		return wire.ResultWrongVIP, fmt.Errorf("connection is for port %d, the FE serves %d", ci.VIP.Port(), port)
	}
	if err := handoff.CheckClient(ci, b.cfg.VAddr, b.local.Has); err != nil {
		return wire.ResultInvalid, err
	}
	return wire.ResultOK, nil
}

// rebuilder rebuilds sockets, clearing an older socket of the same 4-tuple
// out of the way. The FE offers a 4-tuple only after the client opened it
// anew (its SYN reached the FE), so a socket this BE still has for it
// belongs to an earlier connection the client is done with: in TIME_WAIT
// when this BE closed first, or in FIN_WAIT1, CLOSING or LAST_ACK when the
// client's last packets stopped reaching it. A busy client reuses its
// ports within seconds (at thousands of handoffs per second the ephemeral
// range wraps in seconds), and the repair-mode connect then fails with
// EADDRNOTAVAIL (FACTS.md).
type rebuilder struct{ log *slog.Logger }

func (r rebuilder) Rebuild(ci *wire.ConnInfo) (handoff.Rebuilt, error) {
	c, err := repair.Rebuild(ci)
	if err == nil {
		return c, nil
	}
	if !errors.Is(err, unix.EADDRNOTAVAIL) {
		return nil, err
	}
	old, lerr := netif.LookupTCP(ci.VIP, ci.Client)
	if lerr != nil {
		return nil, errors.Join(err, lerr)
	}
	if derr := netif.DestroyTCP(ci.VIP, ci.Client, old); derr != nil {
		return nil, errors.Join(err, derr)
	}
	r.log.Debug("cleared an earlier connection's socket for a reused client port", "op", "restore",
		"client", ci.Client.String(), "state", old.State)
	if c, err = repair.Rebuild(ci); err != nil {
		return nil, err
	}
	return c, nil
}

// run serves control sessions until ctx ends (then it closes those left).
func (b *be) run(ctx context.Context) {
	if err := b.server.Serve(ctx, b.ln); err != nil {
		b.log.Error("handoff listener stopped", "op", "serve", "err", err)
	}
}

// sessionDrain bounds how long FEs take to move their work off sessions
// this BE leaves (an offer's commit comes within the handoff timeout).
const sessionDrain = 10 * time.Second

// drain stops taking handoffs and waits up to d for the relays to end: the
// FEs' sessions are told to go away, and the FEs send new connections
// elsewhere.
func (b *be) drain(d time.Duration) {
	b.recv.Drain()
	b.ln.Close()
	b.server.Drain(min(d, sessionDrain))
	done := make(chan struct{})
	go func() { b.relay.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		b.log.Warn("drain time over; cutting relayed connections", "op", "stop", "relaying", b.relay.Active())
	}
}

// handOver stops this BE's work for a successor that shares its control
// listener: the FEs move their sessions to the successor, the handoffs
// under way here are committed, and the relayed connections stop at their
// next safe point and are returned with their state. Those that reach none
// within a few seconds stay here and end with this process.
func (b *be) handOver() []handed {
	b.ln.Close()
	b.server.Drain(sessionDrain)
	settled := make(chan struct{})
	go func() { b.recv.Wait(); close(settled) }()
	select {
	case <-settled:
	case <-time.After(b.cfg.CommitTimeout):
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var out []handed
	for _, h := range b.relay.Handover(ctx) {
		out = append(out, handed{relay: &h})
	}
	if n := b.relay.Active(); n > 0 {
		b.log.Warn("relayed connections in the middle of an exchange stay with this process", "op", "upgrade", "relaying", n)
	}
	return out
}

// linger waits up to d for the relays a handover left here.
func (b *be) linger(d time.Duration) {
	done := make(chan struct{})
	go func() { b.relay.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		b.log.Warn("cutting relayed connections that were not handed over", "op", "upgrade", "relaying", b.relay.Active())
	}
}

// stop undoes what startBE did; handover leaves the ARP filter and the VIP
// for the next agent. Both are idempotent.
func (b *be) stop() error {
	b.release()
	if b.pool != nil {
		b.pool.Close()
	}
	return b.undo()
}

func (b *be) handover() {
	b.release()
	b.keep()
}

// release closes the control listener (this process's copy of it).
func (b *be) release() {
	if b.ln != nil {
		b.ln.Close()
	}
}

func (b *be) status(w io.Writer) {
	s := b.recv.Stats()
	rs := b.relay.Stats()
	fmt.Fprintf(w, "be vip=%v handoff=%v:%d pid=%d\n", b.cfg.VAddr, b.cfg.RAddr, b.cfg.Port, os.Getpid())
	fmt.Fprintf(w, "  relaying=%d pending=%d served=%d refused=%d sessions=%d upstream=%v at %s\n",
		rs.Active, s.Pending, s.Served, s.Refused, len(b.server.Sessions()),
		b.cfg.Redirect(), time.Now().Format(time.RFC3339))
	fmt.Fprintf(w, "  requests=%d upstream_dialed=%d upstream_reused=%d upstream_idle=%d retries=%d bad_gateway=%d\n",
		rs.Requests, rs.Upstream.Dialed, rs.Upstream.Reuses, rs.Upstream.Idle, rs.Retries, rs.BadGateways)
}
