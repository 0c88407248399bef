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
	"strings"
	"sync"
	"time"

	"tcpha/backends"
	"tcpha/config"
	"tcpha/frontend"
	"tcpha/handoff"
	"tcpha/handoff/conntab"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
	"tcpha/metrics"
	"tcpha/nft"
	"tcpha/queue"
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
	pool   *ctl.Pool
	client *handoff.Client
	sender *handoff.Sender
	ln     net.Listener
	reader *queue.Reader
	obs    *queue.Observer
	reaper *conntab.Reaper
	qmode  nft.QueueMode
	// adopted: the table was a predecessor's, with its clients' forwarding.
	adopted bool
	m       *metrics.Metrics
	front   *frontend.Server
	// loops are the kernel-facing loops, stopped on their own at a
	// handover.
	loops     sync.WaitGroup
	loopsMu   sync.Mutex
	stopLoops context.CancelFunc
	served    chan struct{} // closed when the clients' goroutines have ended
}

// startFE starts the front end; ln, when not nil, is its VIP listener,
// inherited from a predecessor.
func startFE(ctx context.Context, cfg *config.FE, secret []byte, m *metrics.Metrics, log *slog.Logger, ln net.Listener) (*fe, error) {
	f := &fe{cfg: cfg, log: log.With("role", "fe"), table: conntab.New(), health: backends.NewHealth(), m: m,
		served: make(chan struct{})}
	ok := false
	defer func() {
		switch {
		case ok:
		case f.adopted:
			// A predecessor's forwarding is serving clients: leave it.
			f.handover()
		default:
			f.stop()
		}
	}()
	var err error
	// The queue before anything else: only one socket per namespace may
	// bind a queue number (FACTS.md), so a second agent fails here before
	// it touches the first one's table.
	vip := netip.AddrPortFrom(cfg.VAddr, cfg.Port)
	f.obs = &queue.Observer{
		Table: f.table, VIP: vip, TimeWait: cfg.TimeWait, RSTWait: min(cfg.TimeWait, time.Second), Now: time.Now,
	}
	if f.reader, err = queue.Open(cfg.QueueNum, f.log, f.obs.Handle); err != nil {
		return nil, fmt.Errorf("fe: %w (another agent in this network namespace? set [fe] queuenum)", err)
	}
	if f.nftc, err = openNFT(); err != nil {
		return nil, fmt.Errorf("fe: %w", err)
	}
	// The forwarding table goes in before the VIP, so the first packet for
	// the VIP already meets it.
	if err := f.installTable(); err != nil {
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
	if f.ln = ln; ln == nil {
		if f.ln, err = (&net.ListenConfig{}).Listen(ctx, "tcp4", vip.String()); err != nil {
			return nil, fmt.Errorf("fe: listen on VIP %v: %w", vip, err)
		}
	}
	f.flows = nft.NewFlows(f.nftc, f.rs)
	// The reaper's removals are conditional on the table, checked by the
	// nft owner in order with the handoffs' edits.
	skipped := func(err error) error {
		if errors.Is(err, nft.ErrSkipped) {
			return conntab.ErrSkippedEdit
		}
		return err
	}
	f.reaper = &conntab.Reaper{
		Table: f.table,
		Unforward: func(ctx context.Context, flow netip.AddrPort, still func() bool) error {
			return skipped(f.flows.UnforwardIf(ctx, flow, still))
		},
		Remove: func(ctx context.Context, flow netip.AddrPort, still func() bool) error {
			return skipped(f.flows.Remove(ctx, flow, still))
		},
		Forwarded: func(ctx context.Context) (map[netip.AddrPort]netip.Addr, error) {
			return f.flows.Members(ctx, nft.MapForward)
		},
		Idle: cfg.IdleTimeout, Tick: min(time.Second, cfg.TimeWait),
		IdleEvery: min(max(cfg.IdleTimeout/4, time.Second), time.Minute), Log: f.log,
		Alive: func(ctx context.Context) (func(netip.AddrPort) bool, error) {
			m, err := f.flows.Members(ctx, nft.SetAlive)
			if err != nil {
				return nil, err
			}
			return func(k netip.AddrPort) bool { _, ok := m[k]; return ok }, nil
		},
	}
	f.pool = ctl.NewPool(&ctl.Config{
		Secret: secret,
		Local:  wire.Hello{Role: wire.RoleFE, Addr: netip.AddrPortFrom(cfg.RAddr, 0), VIP: vip},
		Log:    f.log,
	}, ctl.Dialer(cfg.RAddr), cfg.ConnPerBE)
	// A BE without a session cannot take a handoff: losing the last one
	// marks it down at once, the first new one brings it back.
	f.pool.OnChange = func(be netip.AddrPort, up bool, err error) {
		if !up {
			f.markDown(be.Addr(), err)
		} else if f.health.Set(be.Addr(), true, time.Now()) {
			f.log.Info("BE available", "op", "detect", "be", be.Addr().String())
		}
	}
	for _, srv := range cfg.Servers {
		f.pool.Add(srv.AddrPort())
	}
	f.waitSessions(2 * time.Second)
	f.client = &handoff.Client{Pool: f.pool}
	f.sched = backends.NewScheduler(cfg.Rules, cfg.Servers, f.health)
	f.sender = &handoff.Sender{
		Flows: f.flows, Peer: f.client, Table: f.table, Log: f.log,
		Timeout: cfg.HandoffTimeout, Now: time.Now,
	}
	if cfg.DtcInterval > 0 {
		// Without detection nothing but a new session would bring a BE
		// marked down back.
		f.sender.Down = func(be netip.AddrPort, err error) { f.markDown(be.Addr(), err) }
	}
	f.front = &frontend.Server{
		Config: frontend.Config{
			MaxClients: cfg.MaxClients, MaxHeads: max(16384, 4*cfg.MaxClients), MaxHeadsPerSource: cfg.MaxConnPerIP,
			RequestTimeout: cfg.RequestTimeout, MaxHeader: cfg.MaxHeader, Local: cfg.Redirect(),
		},
		Route: f.sched.Route, Sender: f.sender, Metrics: m, Log: f.log,
	}
	ok = true
	f.log.Info("front end ready", "op", "start", "vip", vip.String(), "interface", link.Attrs().Name,
		"servers", len(cfg.Servers), "rules", len(cfg.Rules))
	return f, nil
}

// installTable installs the FE's table, taking over the forwarding a
// previous agent left in the kernel (it crashed, or handed over with
// SIGQUIT) in the same transaction, so its clients never notice. The native
// queue expression is tried first; a kernel without nft_queue refuses it
// when the batch is committed, and the xtables target is used instead.
func (f *fe) installTable() error {
	cfg := f.cfg
	carried, err := nft.ReadCarried(f.nftc, nft.FE(nft.FEParams{}).Table)
	if err != nil {
		return fmt.Errorf("read the previous agent's flows: %w", err)
	}
	p := nft.FEParams{
		VIP: cfg.VAddr, Port: cfg.Port,
		FreshTimeout: cfg.RequestTimeout + time.Duration(len(cfg.Servers)+1)*cfg.HandoffTimeout + 5*time.Second,
		TimeWait:     cfg.TimeWait, IdleTimeout: cfg.IdleTimeout,
		// At ~4k handoffs/s (docs/performance.md) a 10 s TIME_WAIT alone
		// holds 40k flows: size the sets well above the 65535 default.
		Size:     uint32(max(1<<18, 4*cfg.MaxClients)),
		QueueNum: cfg.QueueNum,
	}
	var errs []error
	for _, mode := range []nft.QueueMode{nft.QueueNative, nft.QueueCompat} {
		p.Queue = mode
		rs := nft.FE(p)
		rs.Init = carried.Init()
		if err := nft.Apply(f.nftc, rs); err != nil {
			errs = append(errs, fmt.Errorf("with the %v: %w", mode, err))
			continue
		}
		f.rs, f.qmode, f.adopted = rs, mode, carried.Found
		f.log.Info("NFQUEUE rule installed", "op", "start", "queue", cfg.QueueNum, "via", mode.String(),
			"refused", errors.Join(errs...))
		now := time.Now()
		for k, be := range carried.Forward {
			state, until := conntab.Handoffed, time.Time{}
			if carried.Closing[k] {
				state, until = conntab.TimeWait, now.Add(cfg.TimeWait)
			}
			f.table.Adopt(k, be, state, now, until)
		}
		if len(carried.Forward) > 0 {
			f.log.Info("adopted the previous agent's handed-off connections", "op", "start",
				"forwarded", len(carried.Forward), "closing", len(carried.Closing))
		}
		return nil
	}
	return errors.Join(errs...)
}

// waitSessions waits up to d for a session to every BE, so the first
// clients after a start do not find every BE unreachable. BEs still without
// one are logged and stay down until their sessions come up.
func (f *fe) waitSessions(d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		var missing []string
		for _, srv := range f.cfg.Servers {
			if len(f.pool.Sessions(srv.AddrPort())) == 0 {
				missing = append(missing, srv.AddrPort().String())
			}
		}
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			f.log.Warn("starting without control sessions to some BEs", "op", "start", "bes", strings.Join(missing, " "))
			for _, srv := range f.cfg.Servers {
				if len(f.pool.Sessions(srv.AddrPort())) == 0 {
					f.markDown(srv.Addr, errors.New("no control session yet"))
				}
			}
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// run serves clients until serve is done; the kernel-facing loops (flow
// updates, expiry) go on until keep is done, and the queue reader until
// the FE is released, so that handed-off connections can drain in between.
func (f *fe) run(serve, keep context.Context) {
	loops, stop := context.WithCancel(keep)
	defer stop()
	f.loopsMu.Lock()
	f.stopLoops = stop
	f.loopsMu.Unlock()
	f.loops.Go(func() { f.flows.Run(loops) })
	f.loops.Go(func() { f.reaper.Run(loops) })
	if f.cfg.DtcInterval > 0 {
		f.loops.Go(func() { f.detectLoop(serve) })
	}
	f.front.Serve(serve, keep, f.ln)
	close(f.served)
	f.loops.Wait()
}

// linger waits up to d for the work a handover left here (relays to the
// local node, handoffs that did not finish in time).
func (f *fe) linger(d time.Duration) {
	select {
	case <-f.served:
	case <-time.After(d):
		f.log.Warn("cutting connections that were not handed over", "op", "upgrade")
	}
}

// handOver stops the FE's work for a successor that shares its VIP
// listener: it stops accepting, takes the clients still sending their heads
// from their goroutines, lets the handoffs under way finish, and stops the
// kernel-facing loops. Work that does not finish in time (a handoff stuck
// on a BE; a relay to the local node) stays with this process.
func (f *fe) handOver(stopServe func()) []handed {
	stopServe()
	ctx, cancel := context.WithTimeout(context.Background(), 2*f.cfg.HandoffTimeout+time.Second)
	heads := f.front.Handover(ctx)
	cancel()
	f.loopsMu.Lock()
	if f.stopLoops != nil {
		f.stopLoops()
	}
	f.loopsMu.Unlock()
	f.loops.Wait()
	out := make([]handed, len(heads))
	for i := range heads {
		out[i] = handed{head: &heads[i]}
	}
	return out
}

// drain waits until no connection is left in the table, or up to d.
func (f *fe) drain(d time.Duration) {
	deadline := time.Now().Add(d)
	for f.table.Len() > 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if n := f.table.Len(); n > 0 {
		f.log.Warn("drain time over; cutting handed-off connections", "op", "stop", "connections", n)
	}
}

// detectLoop is the seed's BE detection (4.9): a ping every dtcinterval;
// a BE that does not answer is not scheduled until it answers again.
func (f *fe) detectLoop(ctx context.Context) {
	tick := time.NewTicker(f.cfg.DtcInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for _, s := range f.cfg.Servers {
			pctx, cancel := context.WithTimeout(ctx, min(f.cfg.DtcInterval, 2*time.Second))
			h, err := f.client.Probe(pctx, s.AddrPort())
			cancel()
			if ctx.Err() != nil {
				return
			}
			if err == nil && !h.ServerUp {
				err = errors.New("its web server does not answer")
			}
			if err != nil {
				f.markDown(s.Addr, err)
			} else if f.health.Set(s.Addr, true, time.Now()) {
				f.log.Info("BE available", "op", "detect", "be", s.Addr.String())
			}
		}
	}
}

func (f *fe) markDown(be netip.Addr, err error) {
	if f.health.Set(be, false, time.Now()) {
		f.log.Warn("BE not available", "op", "detect", "be", be.String(), "err", err)
	}
}

// stop undoes what startFE did; handover instead leaves the table and the
// VIP for the next agent. Both are idempotent.
func (f *fe) stop() error {
	f.release()
	return f.undo()
}

func (f *fe) handover() {
	f.release()
	f.keep()
}

func (f *fe) release() {
	if f.ln != nil {
		f.ln.Close()
	}
	if f.pool != nil {
		f.pool.Close()
	}
	if f.reader != nil {
		f.reader.Close()
	}
}

func (f *fe) status(w io.Writer) {
	s := f.front.Stats()
	avg := time.Duration(0)
	if s.HandoffLatencyCount > 0 {
		avg = s.HandoffLatencySum / time.Duration(s.HandoffLatencyCount)
	}
	fmt.Fprintf(w, "fe vip=%v:%d pid=%d queue=%d via %v\n", f.cfg.VAddr, f.cfg.Port, os.Getpid(), f.cfg.QueueNum, f.qmode)
	fmt.Fprintf(w, "  accepted=%d handed_off=%d local=%d answered_503=%d bad_request=%d too_large=%d timeout=%d closed_early=%d refused_busy=%d avg_handoff=%v\n",
		s.Accepted, s.HandedOff, s.Local, s.Answered503, s.BadRequests, s.TooLarge, s.Timeouts, s.ClosedEarly, s.RefusedBusy, avg)
	states := f.table.Count()
	fmt.Fprintf(w, "  connections: handoffing=%d handoffed=%d time_wait=%d\n",
		states[conntab.Handoffing], states[conntab.Handoffed], states[conntab.TimeWait])
	fmt.Fprintf(w, "  queued=%d", f.obs.Total())
	for _, c := range f.obs.Counts() {
		fmt.Fprintf(w, " %s:%d", c.Label, c.N)
	}
	fmt.Fprintln(w)
	for _, srv := range f.cfg.Servers {
		state := "up"
		if since, down := f.health.DownSince(srv.Addr); down {
			state = "down since " + since.Format(time.RFC3339)
		}
		fmt.Fprintf(w, "  be %v: %s, control sessions %d\n", srv.AddrPort(), state, len(f.pool.Sessions(srv.AddrPort())))
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
