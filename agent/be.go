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
	"tcpha/handoff/repair"
	"tcpha/handoff/wire"
	"tcpha/nft"
)

// be is a back end: it rebuilds handed-off connections and relays them to
// the unmodified local web server, which answers the client directly.
type be struct {
	cfg *config.BE
	log *slog.Logger
	installed
	ln   net.Listener
	recv *handoff.Receiver
}

func startBE(ctx context.Context, cfg *config.BE, secret []byte, log *slog.Logger) (*be, error) {
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
	ctl := netip.AddrPortFrom(cfg.RAddr, cfg.Port)
	if b.ln, err = (&net.ListenConfig{}).Listen(ctx, "tcp4", ctl.String()); err != nil {
		return nil, fmt.Errorf("be: listen for handoffs on %v: %w", ctl, err)
	}
	up := cfg.Redirect()
	dialer := &net.Dialer{}
	b.recv = &handoff.Receiver{
		Codec: wire.Codec{Secret: secret}, VIP: cfg.VAddr, Rebuilder: rebuilder{log: b.log},
		Upstream: func(ctx context.Context) (*net.TCPConn, error) {
			c, err := dialer.DialContext(ctx, "tcp4", up.String())
			if err != nil {
				return nil, err
			}
			return c.(*net.TCPConn), nil
		},
		CommitTimeout: cfg.CommitTimeout, MaxClients: cfg.MaxClients, Log: b.log,
	}
	ok = true
	b.log.Info("back end ready", "op", "start", "vip", cfg.VAddr.String(), "handoff_port", cfg.Port,
		"upstream", up.String(), "uaddr", cfg.UAddr.String())
	return b, nil
}

// rebuilder restores sockets, clearing a TIME_WAIT of the same 4-tuple out
// of the way. When the web server closed first, this BE holds the 4-tuple in
// TIME_WAIT for 60 s, while a busy client reuses its ephemeral ports sooner
// (at the measured ~4k handoffs/s the range wraps in seconds): the
// repair-mode connect then fails with EADDRNOTAVAIL (FACTS.md).
type rebuilder struct{ log *slog.Logger }

func (r rebuilder) Restore(ci *wire.ConnInfo) (*net.TCPConn, error) {
	c, err := repair.Restore(ci)
	if !errors.Is(err, unix.EADDRNOTAVAIL) {
		return c, err
	}
	vip := net.TCPAddrFromAddrPort(ci.VIP)
	client := net.TCPAddrFromAddrPort(ci.Client)
	s, gerr := netlink.SocketGet(vip, client)
	if gerr != nil || s.State != netlink.TCP_TIME_WAIT {
		// Never destroy a live connection: let the FE try elsewhere.
		return nil, err
	}
	if derr := netlink.SocketDestroy(vip, client); derr != nil {
		return nil, errors.Join(err, fmt.Errorf("destroy TIME_WAIT %v-%v: %w", ci.VIP, ci.Client, derr))
	}
	r.log.Debug("cleared TIME_WAIT for a reused client port", "op", "restore", "client", ci.Client.String())
	return repair.Restore(ci)
}

func (rebuilder) CloseSilently(c *net.TCPConn) error { return repair.CloseSilently(c) }

func (b *be) run(ctx context.Context) {
	if err := b.recv.Serve(ctx, b.ln); err != nil {
		b.log.Error("handoff listener stopped", "op", "serve", "err", err)
	}
}

// drain waits up to d for the relays to end. The handoff listener is
// already closed, so the FE sends new connections elsewhere.
func (b *be) drain(d time.Duration) {
	done := make(chan struct{})
	go func() { b.recv.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		b.log.Warn("drain time over; cutting relayed connections", "op", "stop", "relaying", b.recv.Stats().Active)
	}
}

// stop undoes what startBE did; handover leaves the ARP filter and the VIP
// for the next agent (the relayed connections end with this process). Both
// are idempotent.
func (b *be) stop() error {
	if b.ln != nil {
		b.ln.Close()
	}
	return b.undo()
}

func (b *be) handover() {
	if b.ln != nil {
		b.ln.Close()
	}
	b.keep()
}

func (b *be) status(w io.Writer) {
	s := b.recv.Stats()
	fmt.Fprintf(w, "be vip=%v handoff=%v:%d pid=%d\n", b.cfg.VAddr, b.cfg.RAddr, b.cfg.Port, os.Getpid())
	fmt.Fprintf(w, "  relaying=%d served=%d refused=%d upstream=%v at %s\n", s.Active, s.Served, s.Refused,
		b.cfg.Redirect(), time.Now().Format(time.RFC3339))
}
