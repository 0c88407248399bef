// Package be is the back end's wiring: it takes handoffs (handoff.Receiver)
// on control sessions from its FEs, rebuilds the connections (repair) and
// relays them to the unmodified local web server (relay); it compiles the
// FE's cluster frame to route a keep-alive connection's later requests,
// moves connections (phttp = multi) and keeps pools to other BEs' web
// servers (phttp = forward). Start is where the kernel comes in.
package be

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"tcpha/backends"
	"tcpha/config"
	"tcpha/handoff"
	"tcpha/handoff/ctl"
	"tcpha/handoff/repair"
	"tcpha/handoff/wire"
	"tcpha/internal/accesslog"
	"tcpha/internal/netaddr"
	"tcpha/metrics"
	"tcpha/netif"
	"tcpha/nft"
	"tcpha/register"
	"tcpha/relay"
)

// BE is a back end: it rebuilds handed-off connections and relays them to
// the unmodified local web server, which answers the client directly.
type BE struct {
	cfg *config.BE
	log *slog.Logger
	// owned is the BE's table (its ARP filter); vip the VIP on loopback,
	// if the agent added it.
	owned  nft.Owned
	vip    *netif.VIP
	ln     net.Listener
	server *ctl.Server
	recv   *handoff.Receiver
	pool   *relay.Pool
	relay  *relay.Relay
	local  *netif.LocalAddrs
	// serverUp is the web server's state by the last check; draining is
	// set once the BE stops taking handoffs.
	serverUp, draining atomic.Bool
	// asked is the web server check the FEs' probes ask for (the default
	// until one asks), own this BE's [be] check lines over it; checkWake
	// makes checkLoop run a newly asked check at once.
	asked, own      atomic.Pointer[backends.Check]
	checkWake       chan struct{}
	members         atomic.Pointer[map[netip.Addr]bool]
	registrar       *register.Client
	registering     context.Context
	stopRegistering context.CancelFunc
	handingOver     atomic.Bool
	background      sync.WaitGroup
	// serveEnded is set when the control listener's accept loop ends.
	serveEnded atomic.Bool
	// cluster is the FE's last cluster frame; web the keep-alive pools to
	// other BEs' web servers (phttp = forward).
	cluster atomic.Pointer[beCluster]
	webMu   sync.Mutex
	web     map[netip.Addr]*relay.Pool
	// m are the agent's metrics; reinstalls the ARP table's reinstalls
	// by its guard (guard.go).
	m          *metrics.Metrics
	reinstalls nft.Reinstalls
	// acceptor is the listener on VIP:port with the FE's accept = be
	// (accept.go).
	acceptor acceptor
	// peers are the BE-to-BE sessions to the cluster's other BEs
	// (direct.go); peerMu guards their changes against the stop.
	peerMu sync.Mutex
	peers  *ctl.Pool
	// movesIn counts the connections other BEs moved here directly: their
	// commits.
	movesIn atomic.Int64
	// deliver, with deliver = socket, hands connections to the web
	// server's own socket (deliver.go); nil with the relay. transparent
	// is the routing of its dials from the clients' addresses.
	deliver     *deliverer
	deliverTLS  *deliverer // the same for TLS connections (delivertls.go)
	transparent *netif.Transparent
	// bh is the packet path for delivered connections' later requests
	// (bh.go); nil with the relay.
	bh *bhState
}

// Start starts the back end; ln, when not nil, is its control listener,
// inherited from a predecessor; access, when not nil, hears of every
// request the relay serves ([global] accesslog).
func Start(ctx context.Context, cfg *config.BE, secret []byte, m *metrics.Metrics, log *slog.Logger, ln net.Listener, access func(accesslog.Entry)) (*BE, error) {
	b := &BE{cfg: cfg, log: log.With("role", "be"), m: m}
	ok := false
	defer func() {
		if !ok {
			b.Stop()
		}
	}()
	var err error
	if b.owned.Conn, err = nft.OpenLasting(); err != nil {
		return nil, fmt.Errorf("be: %w", err)
	}
	// ARP filtering first: with the VIP on loopback and no filter the BE
	// would answer ARP for it and steal the cluster's traffic (seed 4.4).
	rs := nft.BE(nft.BEParams{VIP: cfg.VAddr, UAddr: cfg.UAddr})
	if err := nft.Apply(b.owned.Conn, rs); err != nil {
		return nil, fmt.Errorf("be: %w", err)
	}
	b.owned.Rules = rs
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("be: find loopback: %w", err)
	}
	if b.vip, err = netif.AddVIP(lo, cfg.VAddr); err != nil {
		return nil, fmt.Errorf("be: %w", err)
	}
	if b.local, err = netif.NewLocalAddrs(); err != nil {
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
	// Sessions to the other BEs, for direct moves: they come with the
	// FE's cluster frame.
	b.peers = ctl.NewPool(&ctl.Config{
		Secret: secret, Log: b.log,
		Local: wire.Hello{Role: wire.RoleBE, Addr: ctlAddr, VIP: netip.AddrPortFrom(cfg.VAddr, 0)},
		Handler: ctl.HandlerFunc(func(s *ctl.Session, f wire.Frame) {
			s.Reply(f, ctl.AckFrame(wire.ResultInvalid, "a BE asks nothing of the BE that dialed it"))
		}),
	}, ctl.Dialer(cfg.RAddr), 1)
	if cfg.Deliver == config.DeliverSocket {
		if cfg.ClientAddr {
			if b.transparent, err = netif.SetupTransparent(); err != nil {
				return nil, fmt.Errorf("be: deliver = socket, clientaddr = on: %w", err)
			}
		}
		b.deliver = newDeliverer(up, cfg.ClientAddr, b.log, m.Deliveries)
		b.deliver.eligible = func() string { return deliverable(b.cluster.Load(), cfg.RAddr) }
		b.deliver.relay = func(ctx context.Context, _ *wire.ConnInfo) (handoff.Upstream, error) {
			up, err := b.pool.Get(ctx)
			if err != nil {
				return nil, err
			}
			return up, nil
		}
		b.deliver.clear = func(ci *wire.ConnInfo) error { return clearEarlier(b.log, ci) }
		if err := b.startBH(); err != nil {
			return nil, fmt.Errorf("be: deliver = socket: %w", err)
		}
		b.deliverTLS = b.newTLSDeliverer(cfg, b.deliver)
	}
	leaving := &handoff.Leaving{}
	b.relay = relay.New(relay.Config{
		Pool: b.pool, MaxHeader: cfg.MaxHeader, HeadTimeout: cfg.RequestTimeout,
		IdleTimeout: cfg.KeepAliveTimeout, Log: b.log, Route: b.route, RouteFirst: b.routeFirst, Mover: newMover(b, leaving),
		ForwardedFor: cfg.ForwardedFor, Access: servedBy(cfg.RAddr, access),
	})
	b.recv = &handoff.Receiver{
		VIP: cfg.VAddr, Check: b.check, Rebuilder: rebuilder{log: b.log},
		// An idle keep-alive connection to the web server if there is one;
		// a new one fails fast when the server is down. The relay looks at
		// it again before the request goes into it: the server may close
		// it between the offer and the commit.
		// A TLS connection gets a connection of its own to the TLS port,
		// or with deliver = socket the server's TLS socket.
		Connect: func(ctx context.Context, ci *wire.ConnInfo) (handoff.Upstream, error) {
			if relay.IsTLS(ci.RecvQueue) {
				if b.deliverTLS != nil {
					return b.deliverTLS.connect(ctx, ci)
				}
				return relay.DialTLS(ctx, cfg.RedirectTLS(), ci.Client, ci.VIP, cfg.ProxyProtocol)
			}
			if b.deliver != nil {
				return b.deliver.connect(ctx, ci)
			}
			return b.pool.Get(ctx)
		},
		Run: func(client *net.TCPConn, up handoff.Upstream) {
			if up = relayed(up); up == nil {
				return // delivered: the web server owns the connection
			}
			if tu, ok := up.(*relay.TLSUpstream); ok {
				b.relay.ServeTLS(client, tu)
				return
			}
			b.relay.Serve(client, up.(*relay.Upstream))
		},
		// A delivered connection is the web server's: reset by the kernel.
		Reset: func(client netip.AddrPort) bool {
			return b.relay.Reset(client) || b.deliver != nil && b.resetDelivered(client)
		},
		// The kernel's view, not the relay's: a connection handed over to
		// a successor, or closing, is still this BE's.
		Held: func(port uint16) ([]netip.AddrPort, error) {
			return netif.HeldTCP(netip.AddrPortFrom(cfg.VAddr, port))
		},
		CommitTimeout: cfg.CommitTimeout, MaxPending: cfg.MaxClients, Log: b.log,
		Observe: func(r wire.Result) { m.Offers.WithLabelValues(r.String()).Inc() },
		Leaving: leaving,
	}
	b.setMembers(cfg.FEAddrs)
	b.server = &ctl.Server{
		Config: &ctl.Config{
			Secret: secret,
			Local:  wire.Hello{Role: wire.RoleBE, Addr: ctlAddr, VIP: netip.AddrPortFrom(cfg.VAddr, 0)},
			Handler: ctl.HandlerFunc(func(s *ctl.Session, f wire.Frame) {
				if s.Peer.Role == wire.RoleBE && !slices.Contains(peerFrames, f.Type) {
					b.log.Warn("frame refused from another BE", "op", "control", "type", f.Type.String(), "peer", s.Remote.String())
					s.Reply(f, ctl.AckFrame(wire.ResultInvalid, f.Type.String()+" is not a BE's to send"))
					return
				}
				if s.Peer.Role == wire.RoleBE && f.Type == wire.TypeCommit {
					b.movesIn.Add(1) // a direct move's last word
				}
				switch f.Type {
				case wire.TypeCluster:
					b.serveCluster(s, f)
					return
				case wire.TypeStats:
					// Atomic loads only: answered on the session's reader.
					p, _ := b.relayStats().MarshalBinary()
					s.Reply(f, wire.Frame{Type: wire.TypeStatsReply, Payload: p})
					return
				}
				b.recv.Serve(s, f)
			}),
			Health: b.health,
			Log:    b.log,
		},
		Member: func(a netip.Addr) bool { return (*b.members.Load())[a] || b.isPeer(a) },
		Admit:  b.admit,
	}
	// The web server's state, for the FEs' probes: checked now, then every
	// second in the background (a probe must not wait for it).
	b.checkWake = make(chan struct{}, 1)
	b.asked.Store(&backends.DefaultCheck)
	b.own.Store(&cfg.Check)
	b.serverUp.Store(relay.Check(ctx, up.String(), b.webCheck(), 500*time.Millisecond) == nil)
	if cfg.DRegister {
		var fes []netip.AddrPort
		for _, a := range cfg.FEAddrs {
			fes = append(fes, netip.AddrPortFrom(a, cfg.FEPort))
		}
		b.registrar = &register.Client{
			Config: &ctl.Config{Secret: secret, Log: b.log,
				Local: wire.Hello{Role: wire.RoleBE, Addr: ctlAddr, VIP: netip.AddrPortFrom(cfg.VAddr, 0)}},
			Dial: ctl.Dialer(cfg.RAddr), FEs: fes, Weight: 1, Rules: cfg.Rules, Log: b.log,
		}
		b.registering, b.stopRegistering = context.WithCancel(context.Background())
	}
	m.Registry.MustRegister(collector{b})
	ok = true
	b.log.Info("back end ready", "op", "start", "vip", cfg.VAddr.String(), "handoff_port", cfg.Port,
		"upstream", up.String(), "uaddr", cfg.UAddr.String(), "fe", fmt.Sprint(cfg.FEAddrs), "authenticated", len(secret) > 0)
	return b, nil
}

// admit takes a session only from an FE that serves this BE's VIP and says
// so from its own address.
func (b *BE) admit(remote net.Addr, h wire.Hello) error {
	src := netaddr.AddrPort(remote).Addr()
	if h.Role == wire.RoleBE {
		// Another BE of the FE's cluster frame, for direct moves.
		switch {
		case !b.isPeer(src):
			return fmt.Errorf("%v is not a BE of this cluster", src)
		case h.Addr.Addr() != src:
			return fmt.Errorf("hello claims %v but comes from %v", h.Addr.Addr(), src)
		case h.VIP.Addr() != b.cfg.VAddr:
			return fmt.Errorf("the BE serves VIP %v, this BE serves %v", h.VIP.Addr(), b.cfg.VAddr)
		}
		return nil
	}
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
func (b *BE) check(ci *wire.ConnInfo, from *ctl.Session) (wire.Result, error) {
	fe := from.Peer
	if fe.Role == wire.RoleBE {
		// A direct move: the ports are those of the FE whose cluster
		// frame named the other BE.
		c := b.cluster.Load()
		if c == nil {
			return wire.ResultInvalid, errors.New("no cluster frame from the FE yet")
		}
		fe = c.fe
	}
	if res, err := checkPort(ci, fe); err != nil {
		return res, err
	}
	if err := handoff.CheckClient(ci, b.cfg.VAddr, b.local.Has); err != nil {
		return wire.ResultInvalid, err
	}
	return wire.ResultOK, nil
}

// checkPort accepts a connection for the VIP port its FE serves, or for the
// FE's TLS port; what the connection carries must fit its port, because the
// BE picks the HTTP relay or the raw TLS relay by the request's first byte
// (relay.IsTLS).
func checkPort(ci *wire.ConnInfo, fe wire.Hello) (wire.Result, error) {
	port, tls := ci.VIP.Port(), relay.IsTLS(ci.RecvQueue)
	switch {
	case port == fe.VIP.Port() && !tls:
		return wire.ResultOK, nil
	case port == fe.VIP.Port():
		return wire.ResultInvalid, fmt.Errorf("a TLS ClientHello on the HTTP port %d", port)
	case fe.TLSPort == 0 || port != fe.TLSPort:
		return wire.ResultWrongVIP, fmt.Errorf("connection is for port %d, the FE serves %d (TLS %d)", port, fe.VIP.Port(), fe.TLSPort)
	case !tls:
		return wire.ResultInvalid, fmt.Errorf("no TLS ClientHello on the TLS port %d", port)
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
	if cerr := clearEarlier(r.log, ci); cerr != nil {
		return nil, errors.Join(err, cerr)
	}
	if c, err = repair.Rebuild(ci); err != nil {
		return nil, err
	}
	return c, nil
}

// clearEarlier destroys a socket this BE still has for ci's 4-tuple (see
// rebuilder), if any.
func clearEarlier(log *slog.Logger, ci *wire.ConnInfo) error {
	old, err := netif.LookupTCP(ci.VIP, ci.Client)
	if errors.Is(err, netif.ErrNoSocket) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := netif.DestroyTCP(ci.VIP, ci.Client, old); err != nil {
		return err
	}
	log.Debug("cleared an earlier connection's socket for a reused client port", "op", "restore",
		"client", ci.Client.String(), "state", old.State)
	return nil
}

// Run serves control sessions until ctx ends (then it closes those left),
// checks the web server, and keeps the BE registered with its FEs when it
// registers itself.
func (b *BE) Run(ctx context.Context) {
	bg, stop := context.WithCancel(ctx)
	b.background.Go(func() { b.checkLoop(bg) })
	b.background.Go(func() { b.guard().Run(bg) })
	if b.deliver != nil {
		b.background.Go(func() { b.deliver.run(bg) })
		b.background.Go(func() { b.deliverTLS.run(bg) })
	}
	if g := b.guardBH(); g != nil {
		b.background.Go(func() { g.Run(bg) })
	}
	if b.registrar != nil {
		stopReg := context.AfterFunc(bg, b.stopRegistering)
		defer stopReg()
		b.background.Go(func() { b.registrar.Run(b.registering, b.handingOver.Load) })
	}
	if err := b.server.Serve(ctx, b.ln); err != nil {
		b.log.Error("handoff listener stopped", "op", "serve", "err", err)
	}
	b.serveEnded.Store(true)
	stop()
	b.background.Wait()
}

// Alive tells whether the BE still takes handoffs (the agent feeds
// systemd's watchdog on it): its control listener's accept loop has not
// ended. An accept error ends it while the agent runs on, and every
// handoff to this BE would then fail.
func (b *BE) Alive() error {
	if b.serveEnded.Load() {
		return errors.New("the BE no longer takes handoffs: its control listener stopped")
	}
	return nil
}

// unregister deregisters from the FEs (a stop), or just leaves them (a
// handover: the successor registers itself); it does not wait.
func (b *BE) unregister(handover bool) {
	if b.stopRegistering == nil {
		return
	}
	b.handingOver.Store(handover)
	b.stopRegistering()
}

// health answers an FE's probe from the last check of the web server. A
// probe asking for another check than the one running (a new FE, a
// reload) makes checkLoop run it at once; until then, for that one
// probe, the answer is the previous check's.
func (b *BE) health(probe []byte) wire.Health {
	if c, ok := backends.Asked(probe, backends.Check{}); ok && c.String() != b.asked.Load().String() {
		b.asked.Store(&c)
		b.log.Info("web server check asked for", "op", "detect", "check", c.String())
		select {
		case b.checkWake <- struct{}{}:
		default:
		}
	}
	return wire.Health{ServerUp: b.serverUp.Load(), Draining: b.draining.Load(), Active: uint32(b.relay.Active())}
}

// webCheck is the check in force: the one asked for under this BE's own.
func (b *BE) webCheck() backends.Check { return b.asked.Load().Override(*b.own.Load()) }

// checkLoop checks the web server every second and logs when its state
// changes.
func (b *BE) checkLoop(ctx context.Context) {
	addr := b.cfg.Redirect().String()
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Second):
		case <-b.checkWake:
		}
		err := relay.Check(ctx, addr, b.webCheck(), time.Second)
		if ctx.Err() != nil {
			return
		}
		if up := err == nil; b.serverUp.Swap(up) != up {
			if up {
				b.log.Info("web server answers again", "op", "detect", "upstream", addr)
			} else {
				b.log.Warn("web server does not answer: the FEs will stop sending connections", "op", "detect", "upstream", addr, "err", err)
			}
		}
	}
}

// sessionDrain bounds how long FEs take to move their work off sessions
// this BE leaves (an offer's commit comes within the handoff timeout).
const sessionDrain = 10 * time.Second

// Drain stops taking handoffs and waits up to d for the relays to end: the
// FEs' sessions are told to go away, and the FEs send new connections
// elsewhere.
func (b *BE) Drain(d time.Duration) {
	until := time.Now().Add(d)
	ports := b.vipPorts() // while the sessions are there to say
	b.unregister(false)
	b.draining.Store(true)
	b.recv.Drain()
	b.ln.Close()
	b.server.Drain(min(d, sessionDrain))
	// Only now: until the FEs saw this BE go, they placed new flows here.
	b.stopAccepting()
	done := make(chan struct{})
	go func() { b.relay.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		b.log.Warn("drain time over; cutting relayed connections", "op", "stop", "relaying", b.relay.Active())
	}
	if b.deliver != nil {
		b.waitDelivered(ports, until)
	}
}

// HandOver stops this BE's work for a successor that shares its control
// listener: the FEs move their sessions to the successor, the handoffs
// under way here are committed, and the relayed connections stop at their
// next safe point and are returned with their state. Those that reach none
// within a few seconds stay here and end with this process.
func (b *BE) HandOver() []relay.Handed {
	b.unregister(true)
	b.ln.Close()
	b.server.Drain(sessionDrain)
	// The VIP:port listener goes to the successor: connections placed
	// here meanwhile wait in its backlog.
	b.pauseAccepting()
	settled := make(chan struct{})
	go func() { b.recv.Wait(); close(settled) }()
	select {
	case <-settled:
	case <-time.After(b.cfg.CommitTimeout):
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out := b.relay.Handover(ctx)
	if n := b.relay.Active(); n > 0 {
		b.log.Warn("relayed connections in the middle of an exchange stay with this process", "op", "upgrade", "relaying", n)
	}
	return out
}

// Linger waits up to d for the relays a handover left here.
func (b *BE) Linger(d time.Duration) {
	done := make(chan struct{})
	go func() { b.relay.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		b.log.Warn("cutting relayed connections that were not handed over", "op", "upgrade", "relaying", b.relay.Active())
	}
}

// Stop undoes what Start did; Keep leaves the ARP filter and the VIP for
// the next agent. Both are idempotent.
func (b *BE) Stop() error {
	b.Release()
	b.closePeers()
	if b.pool != nil {
		b.pool.Close()
	}
	b.closeWeb()
	return errors.Join(b.vip.Remove(), b.owned.Remove(), b.transparent.Remove(), b.stopBH(false))
}

// Keep lets go of the control listener and leaves the BE's table, VIP
// and the routing of transparent dials.
func (b *BE) Keep() {
	b.Release()
	b.closePeers()
	b.owned.Keep()
	b.transparent.Keep()
	b.stopBH(true)
}

// closePeers ends the BE-to-BE sessions. Not at Release: a move under way
// when a handover let go of the listeners still commits on them.
func (b *BE) closePeers() {
	b.peerMu.Lock()
	defer b.peerMu.Unlock()
	if b.peers != nil {
		b.peers.Close()
		b.peers = nil
	}
}

// Release closes the control listener (this process's copy of it).
func (b *BE) Release() {
	if b.ln != nil {
		b.ln.Close()
	}
	b.stopAccepting()
}

// Status is the BE's part of `tcphactl status`. Its JSON follows
// tcphactl(8)'s rules: addresses without their ports, a port a number.
type Status struct {
	VIP          string          `json:"vip"`
	Addr         string          `json:"addr"` // raddr, where FEs hand off
	Port         uint16          `json:"port"`
	Upstream     string          `json:"upstream"`
	UpstreamPort uint16          `json:"upstream_port"`
	ServerUp     bool            `json:"server_up"`
	Relaying     int             `json:"relaying"`
	Pending      int             `json:"pending"`
	Served       int64           `json:"served"`
	Refused      int64           `json:"refused"`
	Sessions     int             `json:"sessions"`
	Requests     int64           `json:"requests"`
	Dialed       int64           `json:"upstream_dialed"`
	Reused       int64           `json:"upstream_reused"`
	Idle         int             `json:"upstream_idle"`
	Retries      int64           `json:"retries"`
	BadGW        int64           `json:"bad_gateway"`
	Moved        int64           `json:"moved"`
	NotMoved     int64           `json:"not_moved"`
	MovedIn      int64           `json:"moved_in"`
	Table        nft.TableStatus `json:"table"`
	// VIPWithdrawn is set while the VIP is off lo because the ARP
	// filter is not back (guard.go).
	VIPWithdrawn bool `json:"vip_withdrawn"`
	// Deliver is [be] deliver; Deliveries, with socket, counts the
	// connections by result: delivered, or the reason of a fallback to
	// the relay.
	Deliver    string           `json:"deliver"`
	ClientAddr bool             `json:"clientaddr"`
	Deliveries map[string]int64 `json:"deliveries,omitempty"`
	// TLSDeliveries are the same for the TLS connections.
	TLSDeliveries map[string]int64 `json:"tls_deliveries,omitempty"`
}

// feSessions counts the control sessions from FEs (not from other BEs).
func (b *BE) feSessions() int {
	n := 0
	for _, s := range b.server.Sessions() {
		if s.Peer.Role == wire.RoleFE {
			n++
		}
	}
	return n
}

// Status reads the BE's counters.
func (b *BE) Status() Status {
	s := b.recv.Stats()
	rs := b.relay.Stats()
	return Status{
		VIP: b.cfg.VAddr.String(), Addr: b.cfg.RAddr.String(), Port: b.cfg.Port,
		Upstream: b.cfg.Redirect().Addr().String(), UpstreamPort: b.cfg.Redirect().Port(),
		ServerUp: b.serverUp.Load(), Relaying: rs.Active, Pending: s.Pending, Served: s.Served, Refused: s.Refused,
		Sessions: b.feSessions(), Requests: rs.Requests, Dialed: rs.Upstream.Dialed, Reused: rs.Upstream.Reuses,
		Idle: rs.Upstream.Idle, Retries: rs.Retries, BadGW: rs.BadGateways, Moved: rs.Moves + b.bhMoves(true), NotMoved: rs.MoveFailures + b.bhMoves(false), MovedIn: b.movesIn.Load(),
		Table: b.reinstalls.Status(), VIPWithdrawn: b.vip.Withdrawn(), Deliver: string(b.cfg.Deliver), ClientAddr: b.cfg.ClientAddr && b.deliver != nil,
		Deliveries: b.deliveries(), TLSDeliveries: b.tlsDeliveries(),
	}
}

func (b *BE) deliveries() map[string]int64 {
	if b.deliver == nil {
		return nil
	}
	return b.deliver.Counts()
}

// Write writes st as `tcphactl status` shows it.
func (st Status) Write(w io.Writer, pid int) {
	fmt.Fprintf(w, "be vip=%s handoff=%s:%d pid=%d\n", st.VIP, st.Addr, st.Port, pid)
	fmt.Fprintf(w, "  relaying=%d pending=%d served=%d refused=%d sessions=%d upstream=%s:%d server_up=%v at %s\n",
		st.Relaying, st.Pending, st.Served, st.Refused, st.Sessions, st.Upstream, st.UpstreamPort, st.ServerUp, time.Now().Format(time.RFC3339))
	fmt.Fprintf(w, "  requests=%d upstream_dialed=%d upstream_reused=%d upstream_idle=%d retries=%d bad_gateway=%d moved=%d not_moved=%d moved_in=%d\n",
		st.Requests, st.Dialed, st.Reused, st.Idle, st.Retries, st.BadGW, st.Moved, st.NotMoved, st.MovedIn)
	if st.Deliver == string(config.DeliverSocket) {
		from := "127.0.0.1"
		if st.ClientAddr {
			from = "client"
		}
		fmt.Fprintf(w, "  deliver=socket dial_from=%s %s %s\n", from, formatCounts(st.Deliveries), formatTLSCounts(st.TLSDeliveries))
	}
	st.Table.Write(w)
	if st.VIPWithdrawn {
		fmt.Fprintf(w, "  vip withdrawn from lo: the ARP filter is not back\n")
	}
}

// Reload applies a re-read [be]: the FEs it takes sessions from.
func (b *BE) Reload(next *config.BE) {
	b.setMembers(next.FEAddrs)
	b.own.Store(&next.Check)
}

// setMembers sets the FEs whose sessions this BE accepts.
func (b *BE) setMembers(fes []netip.Addr) {
	m := map[netip.Addr]bool{}
	for _, a := range fes {
		m[a] = true
	}
	b.members.Store(&m)
}

// Resume serves a relayed connection a predecessor handed over.
func (b *BE) Resume(h relay.Handed) error { return b.relay.Resume(h) }

// Listener is the BE's control listener, for a successor.
func (b *BE) Listener() net.Listener { return b.ln }

// servedBy names this BE (raddr) in the access log lines of the requests
// its own web server answered, so that the BEs' logs read together say
// who served what; nil stays nil.
func servedBy(raddr netip.Addr, access func(accesslog.Entry)) func(accesslog.Entry) {
	if access == nil {
		return nil
	}
	self := raddr.String()
	return func(e accesslog.Entry) {
		if e.Served == accesslog.Here {
			e.BE = self
		}
		access(e)
	}
}
