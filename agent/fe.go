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
	"sync"
	"time"

	"github.com/google/nftables"

	"tcpha/agent/config"
	"tcpha/backends"
	"tcpha/handoff"
	"tcpha/handoff/conntab"
	"tcpha/handoff/repair"
	"tcpha/handoff/wire"
	"tcpha/nft"
	"tcpha/phttp"
)

// fe is the front end: it owns the VIP, reads each connection's first
// request, and hands the connection to the BE its rule picks.
type fe struct {
	cfg *config.FE
	log *slog.Logger
	installed
	flows  *nft.Flows
	table  *conntab.Table
	sched  *backends.Scheduler
	health *backends.Health
	pool   *backends.Pool
	client *handoff.Client
	sender *handoff.Sender
	ln     net.Listener

	stats feStats
}

// feCounters are what `tcphactl status` reports for the FE.
type feCounters struct {
	accepted, handedOff, local, failed503  int64
	badRequests, timeouts, tooLarge, eofs  int64
	handoffLatencySum, handoffLatencyCount time.Duration
}

type feStats struct {
	mu sync.Mutex
	c  feCounters
}

func (s *feStats) add(f func(*feCounters)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(&s.c)
}

func (s *feStats) get() feCounters {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c
}

func startFE(ctx context.Context, cfg *config.FE, secret []byte, log *slog.Logger) (*fe, error) {
	f := &fe{cfg: cfg, log: log.With("role", "fe"), table: conntab.New(), health: backends.NewHealth()}
	ok := false
	defer func() {
		if !ok {
			f.stop()
		}
	}()
	var err error
	// A lasting netlink socket: opening one per transaction made each
	// handoff's element update cost 8-24 ms instead of 10-60 µs (measured
	// in a namespace, see docs/performance.md).
	if f.nftc, err = nftables.New(nftables.AsLasting()); err != nil {
		return nil, fmt.Errorf("fe: open nftables: %w", err)
	}
	// The forwarding table goes in before the VIP, so the first packet for
	// the VIP already meets it.
	f.rs = nft.FE(nft.FEParams{
		VIP: cfg.VAddr, Port: cfg.Port,
		FreshTimeout: cfg.RequestTimeout + time.Duration(len(cfg.Servers)+1)*cfg.HandoffTimeout + 5*time.Second,
		TimeWait:     cfg.TimeWait, IdleTimeout: cfg.IdleTimeout,
		// At ~4k handoffs/s (docs/performance.md) a 10 s TIME_WAIT alone
		// holds 40k flows: size the sets well above the 65535 default.
		Size: uint32(max(1<<18, 4*cfg.MaxClients)),
	})
	if err := nft.Apply(f.nftc, f.rs); err != nil {
		return nil, fmt.Errorf("fe: %w", err)
	}
	link, err := linkOf(cfg.RAddr)
	if err != nil {
		return nil, fmt.Errorf("fe: %w", err)
	}
	if f.vip, err = addVIP(link, cfg.VAddr); err != nil {
		return nil, fmt.Errorf("fe: %w", err)
	}
	if err := announce(link, cfg.VAddr); err != nil {
		// Not fatal: neighbours still learn the VIP by asking for it.
		f.log.Warn("gratuitous ARP not sent", "op", "vip", "err", err)
	} else {
		f.log.Debug("gratuitous ARP sent", "op", "vip", "vip", cfg.VAddr.String(), "interface", link.Attrs().Name)
	}
	vip := netip.AddrPortFrom(cfg.VAddr, cfg.Port)
	if f.ln, err = (&net.ListenConfig{}).Listen(ctx, "tcp4", vip.String()); err != nil {
		return nil, fmt.Errorf("fe: listen on VIP %v: %w", vip, err)
	}
	f.flows = nft.NewFlows(f.nftc, f.rs)
	f.pool = backends.NewPool(dialControl(cfg.RAddr), cfg.ConnPerBE)
	f.client = &handoff.Client{Pool: f.pool, Codec: wire.Codec{Secret: secret}}
	f.sched = backends.NewScheduler(cfg.Rules, cfg.Servers, f.health)
	f.sender = &handoff.Sender{
		Flows: f.flows, Peer: f.client, Table: f.table, Log: f.log,
		Timeout: cfg.HandoffTimeout, Now: time.Now,
	}
	if cfg.DtcInterval > 0 {
		// Without detection nothing would bring a BE marked down back.
		f.sender.Down = func(be netip.AddrPort, err error) { f.markDown(be.Addr(), err) }
	}
	ok = true
	f.log.Info("front end ready", "op", "start", "vip", vip.String(), "interface", link.Attrs().Name,
		"servers", len(cfg.Servers), "rules", len(cfg.Rules))
	return f, nil
}

func dialControl(raddr netip.Addr) backends.DialFunc {
	d := &net.Dialer{Timeout: time.Second, KeepAlive: 15 * time.Second}
	if raddr.IsValid() && !raddr.IsUnspecified() {
		// Control traffic leaves from the FE's real address, never the VIP.
		d.LocalAddr = &net.TCPAddr{IP: raddr.AsSlice()}
	}
	return func(ctx context.Context, be netip.AddrPort) (net.Conn, error) {
		return d.DialContext(ctx, "tcp4", be.String())
	}
}

// run serves until ctx is done.
func (f *fe) run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { f.flows.Run(ctx) })
	wg.Go(func() { f.expireLoop(ctx) })
	if f.cfg.DtcInterval > 0 {
		wg.Go(func() { f.detectLoop(ctx) })
	}
	f.acceptLoop(ctx)
	wg.Wait()
}

// acceptLoop accepts clients, at most maxclients at once; beyond that they
// wait in the listen backlog.
func (f *fe) acceptLoop(ctx context.Context) {
	stop := context.AfterFunc(ctx, func() { f.ln.Close() })
	defer stop()
	slots := make(chan struct{}, f.cfg.MaxClients)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		c, err := f.ln.Accept()
		if err != nil {
			<-slots
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			f.log.Warn("accept", "op", "accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		f.stats.add(func(s *feCounters) { s.accepted++ })
		wg.Go(func() {
			defer func() { <-slots }()
			f.serve(ctx, c.(*net.TCPConn))
		})
	}
}

// serve handles one client connection: read its first request within the
// limits, then hand it off, serve it locally, or answer with an error.
func (f *fe) serve(ctx context.Context, c *net.TCPConn) {
	client, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	log := f.log.With("client", client.String())
	c.SetReadDeadline(time.Now().Add(f.cfg.RequestTimeout))
	req, err := phttp.Read(c, f.cfg.MaxHeader)
	if err != nil {
		f.refuse(c, err, log)
		return
	}
	c.SetReadDeadline(time.Time{})
	log = log.With("path", req.Path)
	cands := f.sched.Candidates(req.Path)
	var bes []netip.AddrPort
	local := false
	for _, t := range cands {
		if t.Local {
			local = true
			if len(bes) == 0 {
				break // the first choice is the local node
			}
			continue
		}
		bes = append(bes, t.BE)
	}
	if len(bes) > 0 {
		start := time.Now()
		be, err := f.sender.Migrate(ctx, tcpSocket{c}, client, req.Raw, bes)
		if err == nil {
			lat := time.Since(start)
			f.stats.add(func(s *feCounters) { s.handedOff++; s.handoffLatencySum += lat; s.handoffLatencyCount++ })
			log.Info("handed off", "op", "handoff", "be", be.Addr().String(), "latency", lat)
			return
		}
		log.Warn("handoff failed; FE keeps the connection", "op", "handoff", "err", err)
		if !errors.Is(err, handoff.ErrNoBE) {
			local = false // the connection may not be usable: answer, do not relay
		}
	}
	if local {
		f.serveLocal(c, req, log)
		return
	}
	f.stats.add(func(s *feCounters) { s.failed503++ })
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	c.Write(phttp.ErrorResponse(503, "no back end available for "+req.Path))
	c.Close()
}

func (f *fe) refuse(c *net.TCPConn, err error, log *slog.Logger) {
	defer c.Close()
	status := phttp.Status(err)
	var ne net.Error
	switch {
	case status == 400:
		f.stats.add(func(s *feCounters) { s.badRequests++ })
	case status == 431:
		f.stats.add(func(s *feCounters) { s.tooLarge++ })
	case errors.As(err, &ne) && ne.Timeout():
		f.stats.add(func(s *feCounters) { s.timeouts++ })
		status = 408
	default: // the client went away
		f.stats.add(func(s *feCounters) { s.eofs++ })
		log.Debug("client closed before a request", "op", "read", "err", err)
		return
	}
	log.Info("request refused", "op", "read", "status", status, "err", err)
	c.SetWriteDeadline(time.Now().Add(time.Second))
	c.Write(phttp.ErrorResponse(status, err.Error()))
}

// serveLocal relays the connection to the FE's own web server (the seed's
// local node, 4.7).
func (f *fe) serveLocal(c *net.TCPConn, req *phttp.Request, log *slog.Logger) {
	up, err := net.DialTimeout("tcp4", f.cfg.Redirect().String(), time.Second)
	if err != nil {
		log.Warn("local node unreachable", "op", "local", "err", err)
		f.stats.add(func(s *feCounters) { s.failed503++ })
		c.Write(phttp.ErrorResponse(503, "local server unreachable"))
		c.Close()
		return
	}
	if _, err := up.Write(req.Raw); err != nil {
		up.Close()
		c.Close()
		return
	}
	f.stats.add(func(s *feCounters) { s.local++ })
	log.Info("served by local node", "op", "local")
	handoff.Relay(c, up.(*net.TCPConn))
}

// tcpSocket adapts a client connection to handoff.Socket.
type tcpSocket struct{ c *net.TCPConn }

func (s tcpSocket) Dump(consumed []byte) (*wire.ConnInfo, error) { return repair.Dump(s.c, consumed) }
func (s tcpSocket) CloseSilently() error                         { return repair.CloseSilently(s.c) }
func (s tcpSocket) Resume() error                                { return repair.Resume(s.c) }

// expireLoop follows the handed-off flows' ends: a flow that carried FIN or
// RST enters TIME_WAIT and is unforwarded after timewait; a flow silent for
// idletimeout is unforwarded too.
func (f *fe) expireLoop(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	idleEvery := min(max(f.cfg.IdleTimeout/4, time.Second), time.Minute)
	lastIdle := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if f.table.Len() == 0 {
			continue
		}
		now := time.Now()
		closing, err := f.flows.Members(ctx, nft.SetClosing)
		if err != nil {
			f.log.Warn("read closing flows", "op", "expire", "err", err)
			continue
		}
		for k := range closing {
			if f.table.Closing(k, now) {
				f.log.Debug("connection closing", "op", "expire", "client", k.String(), "state", conntab.TimeWait.String())
			}
		}
		var alive func(netip.AddrPort) bool
		if now.Sub(lastIdle) >= idleEvery {
			lastIdle = now
			if m, err := f.flows.Members(ctx, nft.SetAlive); err == nil {
				alive = func(k netip.AddrPort) bool { _, ok := m[k]; return ok }
			}
		}
		for _, k := range f.table.Expired(now, f.cfg.TimeWait, f.cfg.IdleTimeout, alive) {
			if err := f.flows.Unforward(ctx, k); err != nil {
				f.log.Warn("unforward", "op", "expire", "client", k.String(), "err", err)
			}
			f.table.Remove(k)
		}
	}
}

// detectLoop is the seed's BE detection (4.9): a ping every dtcinterval;
// a BE that does not answer is not scheduled until it answers again.
func (f *fe) detectLoop(ctx context.Context) {
	tick := time.NewTicker(f.cfg.DtcInterval)
	defer tick.Stop()
	for {
		for _, s := range f.cfg.Servers {
			pctx, cancel := context.WithTimeout(ctx, min(f.cfg.DtcInterval, 2*time.Second))
			err := f.client.Ping(pctx, s.AddrPort())
			cancel()
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				f.markDown(s.Addr, err)
			} else if f.health.Set(s.Addr, true, time.Now()) {
				f.log.Info("BE available", "op", "detect", "be", s.Addr.String())
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (f *fe) markDown(be netip.Addr, err error) {
	if f.health.Set(be, false, time.Now()) {
		f.log.Warn("BE not available", "op", "detect", "be", be.String(), "err", err)
	}
	for _, s := range f.cfg.Servers {
		if s.Addr == be {
			f.pool.Drop(s.AddrPort())
		}
	}
}

// stop undoes what startFE did. Handed-off connections lose their
// forwarding with the table. It is idempotent.
func (f *fe) stop() error {
	if f.ln != nil {
		f.ln.Close()
	}
	if f.pool != nil {
		f.pool.Close()
	}
	return f.undo()
}

func (f *fe) status(w io.Writer) {
	s := f.stats.get()
	avg := time.Duration(0)
	if s.handoffLatencyCount > 0 {
		avg = s.handoffLatencySum / s.handoffLatencyCount
	}
	fmt.Fprintf(w, "fe vip=%v:%d pid=%d\n", f.cfg.VAddr, f.cfg.Port, os.Getpid())
	fmt.Fprintf(w, "  accepted=%d handed_off=%d local=%d answered_503=%d bad_request=%d too_large=%d timeout=%d closed_early=%d avg_handoff=%v\n",
		s.accepted, s.handedOff, s.local, s.failed503, s.badRequests, s.tooLarge, s.timeouts, s.eofs, avg)
	for _, srv := range f.cfg.Servers {
		state := "up"
		if since, down := f.health.DownSince(srv.Addr); down {
			state = "down since " + since.Format(time.RFC3339)
		}
		fmt.Fprintf(w, "  be %v: %s, idle control connections %d\n", srv.AddrPort(), state, f.pool.Idle(srv.AddrPort()))
	}
}

func (f *fe) conns(w io.Writer) {
	fmt.Fprintf(w, "%-21s %-15s %-10s %-10s %s\n", "client", "be", "state", "age", "handoff")
	now := time.Now()
	for _, c := range f.table.Snapshot() {
		be := "-"
		if c.BE.IsValid() {
			be = c.BE.String()
		}
		fmt.Fprintf(w, "%-21s %-15s %-10s %-10s %v\n", c.Client, be, c.State,
			now.Sub(c.Started).Truncate(time.Second), c.Latency)
	}
}
