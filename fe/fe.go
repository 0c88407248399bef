// Package fe is the front end's wiring: it owns the VIP, reads each
// connection's first request (frontend), hands the connection to the BE its
// rule picks (handoff), forwards the client's later packets in the kernel
// (nft), and keeps its BEs' state (backends): detection, registrations,
// the cluster frame, migrations, drain. Its decisions are methods over
// small interfaces (Forwarding, Peers, Mover) and pure functions, tested
// without root; Start is where the kernel comes in.
package fe

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"

	"tcpha/backends"
	"tcpha/config"
	"tcpha/frontend"
	"tcpha/handoff"
	"tcpha/handoff/conntab"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
	"tcpha/internal/accesslog"
	"tcpha/metrics"
	"tcpha/netif"
	"tcpha/nft"
	"tcpha/queue"
	"tcpha/register"
)

// Forwarding is the FE's forwarding of handed-off clients in the kernel:
// nft.Flows, the one owner of the FE table's sets.
type Forwarding interface {
	handoff.Flows
	// Run carries out the edits until ctx ends.
	Run(ctx context.Context)
	// UnforwardIf and Remove end a flow's forwarding (its mark; its
	// element too), if still holds when the edit is made.
	UnforwardIf(ctx context.Context, flow netip.AddrPort, still func() bool) error
	Remove(ctx context.Context, flow netip.AddrPort, still func() bool) error
	// Forwarded is what the kernel forwarded so far.
	Forwarded(ctx context.Context) (packets, bytes uint64, err error)
	// Reinstall replaces the table, in order with the edits.
	Reinstall(ctx context.Context, install func(*nftables.Conn) (*nft.Ruleset, error)) error
	// Exec edits the table as installed, in order with the edits (the
	// placement's slots).
	Exec(ctx context.Context, fn func(*nftables.Conn, *nft.Ruleset) error) error
}

// Peers is how the FE asks its BEs over the control sessions
// (handoff.Client).
type Peers interface {
	handoff.Peer
	Probe(ctx context.Context, be netip.AddrPort, check []byte) (wire.Health, error)
	Reset(ctx context.Context, be, client netip.AddrPort) error
	Held(ctx context.Context, be netip.AddrPort) (map[netip.AddrPort]bool, error)
	Stats(ctx context.Context, be netip.AddrPort) (wire.RelayStats, error)
}

// FE is the front end: it owns the VIP, reads each connection's first
// request, and hands the connection to the BE its rule picks.
type FE struct {
	cfg *config.FE
	log *slog.Logger
	// owned is the FE's table; vip the VIP, if the agent added it.
	owned nft.Owned
	vip   *netif.VIP
	flows Forwarding
	table *conntab.Table
	sched *backends.Scheduler
	// dtc is the detection interval, changed at run time by tcphactl;
	// check the web server check the probes ask the BEs for ([fe] check,
	// as text), which a reload may change.
	dtc    atomic.Int64
	check  atomic.Pointer[[]byte]
	pool   *ctl.Pool
	client Peers
	sender *handoff.Sender
	ln     net.Listener
	tlsLn  net.Listener // VIP:tlsport; nil without [fe] tlsport
	reader *queue.Reader
	obs    *queue.Observer
	reaper *conntab.Reaper
	// setsc is the reaper's netlink socket, its own: its reads of the
	// flow sets never wait behind the handoffs' edits.
	setsc *nftables.Conn
	qmode nft.QueueMode
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
	// regLn and regSrv take BEs' registrations (seed 4.10).
	regLn  net.Listener
	regSrv *ctl.Server
	// clusterKick asks for the cluster frame to go out now (cluster.go);
	// phttp is the [fe] phttp mode the BEs are told, which a reload may
	// change.
	clusterKick chan struct{}
	phttp       atomic.Uint32
	// loads is the load view the cluster frame publishes with accept =
	// be, taken after each round of probes (cluster.go).
	loads atomic.Pointer[map[netip.Addr]uint32]
	// mover carries out the migrations BEs ask for (move.go), once
	// the FE is up; moves bounds them.
	mover atomic.Pointer[Mover]
	moves chan struct{}
	// running is set once the FE runs (clusterLoop): from then on a new
	// session gets the cluster frame at once.
	running         atomic.Bool
	moved, notMoved atomic.Int64
	// held are the BEs to ask which connections they hold (held.go).
	held heldAsks
	// reinstalls are the table's reinstalls by its guard (guard.go).
	reinstalls nft.Reinstalls
	// place is the placement of new flows with accept = be (place.go);
	// nil with accept = fe.
	place *placer
	// released is set once Release closes the sessions: the BEs they
	// leave are not failures.
	released atomic.Bool
	// rates are each BE's rates and peaks, sampled by statsLoop with the
	// BEs' relay counters (incident.go).
	rates      backends.Rates
	relayStats relayCounters
	// sync is the flow sync with the other FE ([fe] syncpeer; nil
	// without), act whether this FE holds the VIP (sync.go).
	sync *syncer
	// switched are the BE-to-BE switches carried out lately, to answer
	// one asked again (sync.go).
	switched switches
	act      activity
}

// listenRegister opens the port BEs register on: [fe] raddr:feport, never
// the VIP, and only with [fe] dregister = 1 (the config then holds the
// cluster secret and a real address). Without it no port is open to
// strangers (issue 19: every stranger's connection cost a log line),
// unless [fe] syncpeer needs it for the peer FE's sync session: then BEs
// are refused there.
func (f *FE) listenRegister(ctx context.Context, secret []byte, lns Listeners) error {
	ln := lns.Register
	cfg := f.cfg
	var rs *register.Server
	if !cfg.DRegister || len(secret) == 0 || cfg.RAddr.IsUnspecified() {
		f.log.Info("BE registration off: [fe] dregister is not 1", "op", "start")
		// A predecessor's registrations cannot be renewed here.
		for _, reg := range lns.Registered {
			f.pool.Remove(reg.Server.AddrPort())
			f.sched.Deregister(reg.Server.Addr)
		}
		if f.sync == nil {
			if ln != nil {
				// A predecessor's port, which this config closes.
				ln.Close()
			}
			return nil
		}
	} else {
		rs = f.registerServer()
		for _, reg := range lns.Registered {
			rs.Adopt(reg.Server.Addr)
		}
	}
	addr := netip.AddrPortFrom(cfg.RAddr, cfg.FEPort)
	if f.regLn = ln; ln == nil {
		var err error
		if f.regLn, err = (&net.ListenConfig{}).Listen(ctx, "tcp4", addr.String()); err != nil {
			return fmt.Errorf("listen for registrations and the peer FE's sync on %v: %w", addr, err)
		}
	}
	// One port, two kinds of session: BEs' registrations, and the peer
	// FE's sync ([fe] syncpeer), told apart by the role in their hello.
	f.regSrv = &ctl.Server{
		Config: &ctl.Config{Secret: secret, Log: f.log,
			Handler: ctl.HandlerFunc(func(s *ctl.Session, fr wire.Frame) {
				if s.Peer.Role == wire.RoleFE {
					f.serveSync(s, fr)
				} else {
					rs.Serve(s, fr)
				}
			}),
			Local: wire.Hello{Role: wire.RoleFE, Addr: addr, VIP: netip.AddrPortFrom(cfg.VAddr, cfg.Port), TLSPort: cfg.TLSPort}},
		Admit: func(remote net.Addr, h wire.Hello) error {
			if h.Role == wire.RoleFE {
				return f.admitPeer(remote, h)
			}
			if rs == nil {
				return errors.New("BE registration is off ([fe] dregister is not 1)")
			}
			return rs.Admit(remote, h)
		},
	}
	if rs != nil {
		f.log.Info("taking BE registrations", "op", "start", "addr", addr.String())
	}
	return nil
}

// registerServer takes BEs' registrations (seed 4.10).
func (f *FE) registerServer() *register.Server {
	return &register.Server{
		VIP: f.cfg.VAddr, Log: f.log,
		Add: func(r backends.Registration) error {
			if err := f.sched.Register(r); err != nil {
				return err
			}
			f.pool.Add(r.Server.AddrPort())
			f.kickCluster()
			return nil
		},
		Remove: func(a netip.Addr) {
			for _, srv := range f.sched.Servers() {
				if srv.Addr == a {
					f.pool.Remove(srv.AddrPort())
				}
			}
			f.sched.Deregister(a)
			f.kickCluster()
		},
	}
}

// Listeners are the FE's listening sockets a predecessor handed over.
type Listeners struct {
	VIP, Register net.Listener
	// TLS is VIP:tlsport's.
	TLS net.Listener
	// Registered are the predecessor's registered BEs.
	Registered []backends.Registration
}

// newFE is an FE of cfg with nothing in the kernel yet: its scheduling,
// its connection table and its bounds.
func newFE(cfg *config.FE, m *metrics.Metrics, log *slog.Logger) *FE {
	f := &FE{cfg: cfg, log: log.With("role", "fe"), table: conntab.New(), m: m, served: make(chan struct{}),
		clusterKick: make(chan struct{}, 1), moves: make(chan struct{}, maxMoves)}
	f.phttp.Store(uint32(phttpMode(cfg.PHTTP)))
	f.dtc.Store(int64(cfg.DtcInterval))
	f.setCheck(cfg.Check)
	f.relayStats = relayCounters{last: map[netip.Addr]wire.RelayStats{}, silent: map[netip.Addr]time.Time{}}
	f.sched = backends.NewScheduler(cfg.Table(), backends.Options{Rise: cfg.Rise, Fall: cfg.Fall, Live: f.table.Live})
	if f.acceptBE() {
		f.place = newPlacer()
	}
	return f
}

// Start starts the front end on the listeners a predecessor handed over,
// or on new ones; access, when not nil, hears of every connection with a
// request ([global] accesslog).
func Start(ctx context.Context, cfg *config.FE, secret []byte, m *metrics.Metrics, log *slog.Logger, lns Listeners, access func(accesslog.Entry)) (*FE, error) {
	f := newFE(cfg, m, log)
	ok := false
	defer func() {
		if !ok && f.setsc != nil {
			f.setsc.CloseLasting() // the reaper, its owner, never ran
		}
		switch {
		case ok:
		case f.adopted:
			// A predecessor's forwarding is serving clients: leave it.
			f.Keep()
		default:
			f.Stop()
		}
	}()
	var err error
	// The queue before anything else: only one socket per namespace may
	// bind a queue number (FACTS.md), so a second agent fails here before
	// it touches the first one's table.
	vip := netip.AddrPortFrom(cfg.VAddr, cfg.Port)
	f.obs = &queue.Observer{
		Table: f.table, VIP: vip, TLSPort: cfg.TLSPort, TimeWait: cfg.TimeWait, RSTWait: min(cfg.TimeWait, time.Second), Now: time.Now,
	}
	if f.reader, err = queue.Open(cfg.QueueNum, f.log, f.obs.Handle); err != nil {
		return nil, fmt.Errorf("fe: %w (another agent in this network namespace? set [fe] queuenum)", err)
	}
	if f.owned.Conn, err = nft.OpenLasting(); err != nil {
		return nil, fmt.Errorf("fe: %w", err)
	}
	// The forwarding table goes in before the VIP, so the first packet for
	// the VIP already meets it.
	if err := f.installTable(); err != nil {
		return nil, fmt.Errorf("fe: %w", err)
	}
	link, err := netif.LinkOf(cfg.RAddr)
	if err != nil {
		return nil, fmt.Errorf("fe: %w", err)
	}
	// With vip = keepalived, VRRP adds, announces and removes the VIP: the
	// agent leaves it alone (f.vip stays nil, so Stop removes nothing).
	if cfg.VIP == config.VIPAgent {
		if f.vip, err = netif.AddVIP(link, cfg.VAddr); err != nil {
			return nil, fmt.Errorf("fe: %w", err)
		}
		if err := netif.Announce(link, cfg.VAddr); err != nil {
			// Not fatal: neighbours still learn the VIP by asking for it.
			f.log.Warn("gratuitous ARP not sent", "op", "vip", "err", err)
		} else {
			f.log.Debug("gratuitous ARP sent", "op", "vip", "vip", cfg.VAddr.String(), "interface", link.Attrs().Name)
		}
	}
	// IP_FREEBIND: a standby under keepalived listens before it holds the
	// VIP. Listeners handed over at an upgrade keep the option.
	if f.ln = lns.VIP; f.ln == nil {
		if f.ln, err = netif.ListenFreebind(ctx, vip); err != nil {
			return nil, fmt.Errorf("fe: listen on VIP %v: %w", vip, err)
		}
	}
	if f.tlsLn = lns.TLS; f.tlsLn == nil && cfg.TLSPort != 0 {
		tlsAddr := netip.AddrPortFrom(cfg.VAddr, cfg.TLSPort)
		if f.tlsLn, err = netif.ListenFreebind(ctx, tlsAddr); err != nil {
			return nil, fmt.Errorf("fe: listen on VIP %v for TLS: %w", tlsAddr, err)
		}
	}
	f.flows = nft.NewFlows(f.owned.Conn, f.owned.Rules)
	// Under keepalived a syncing FE is standby until the VIP shows up.
	var holdsVIP func() (bool, error)
	if cfg.VIP == config.VIPKeepalived {
		holdsVIP = func() (bool, error) { return netif.HasAddr(link, cfg.VAddr) }
	}
	f.startSync(secret, holdsVIP)
	// The reaper reads on a socket of its own: its reads never wait
	// behind the handoffs' edits, nor they behind its reads.
	if f.setsc, err = nft.OpenLasting(); err != nil {
		return nil, fmt.Errorf("fe: %w", err)
	}
	f.reaper = f.newReaper(nft.NewReader(f.setsc, f.owned.Rules))
	if f.place != nil {
		// The moves' look-ups of who holds a flow: a socket of their own,
		// beside the reaper's and the edits'.
		lc, err := nft.OpenLasting()
		if err != nil {
			return nil, fmt.Errorf("fe: %w", err)
		}
		f.place.look = nft.NewReader(lc, f.owned.Rules)
	}
	f.pool = ctl.NewPool(&ctl.Config{
		Secret:  secret,
		Local:   wire.Hello{Role: wire.RoleFE, Addr: netip.AddrPortFrom(cfg.RAddr, 0), VIP: vip, TLSPort: cfg.TLSPort},
		Log:     f.log,
		Handler: ctl.HandlerFunc(f.serveBE),
	}, ctl.Dialer(cfg.RAddr), cfg.ConnPerBE)
	// A BE without a session cannot take a handoff: losing the last one
	// makes it unavailable at once, the first new one available again
	// (unless its probes say otherwise).
	f.pool.OnChange = func(be netip.AddrPort, up bool, err error) {
		if !up && err == nil {
			err = errors.New("control sessions closed")
		}
		f.changed(be.Addr(), f.sched.Session, up, err)
	}
	f.pool.OnSession = f.newSession
	// A predecessor's registered BEs are scheduled at once, with sessions
	// like the configured ones; they register again with this agent.
	for _, reg := range lns.Registered {
		if err := f.sched.Register(reg); err != nil {
			f.log.Warn("registration not adopted", "op", "register", "be", reg.Server.Addr.String(), "err", err)
		}
	}
	for _, srv := range f.sched.Servers() {
		f.pool.Add(srv.AddrPort())
	}
	f.waitSessions(2 * time.Second)
	f.client = &handoff.Client{Pool: f.pool}
	f.sender = &handoff.Sender{
		Capacity: flowCapacity(f.owned.Rules),
		Flows:    f.flows, Peer: f.client, Table: f.table, Log: f.log,
		Timeout: cfg.HandoffTimeout, Now: time.Now,
		Result: func(be netip.AddrPort, err error) {
			if err == nil {
				f.sched.Handed(be.Addr())
			} else {
				f.sched.Failed(be.Addr())
			}
		},
	}
	var mover Mover = f.sender
	f.mover.Store(&mover)
	if err := f.listenRegister(ctx, secret, lns); err != nil {
		return nil, fmt.Errorf("fe: %w", err)
	}
	f.front = &frontend.Server{
		Config: frontend.Config{
			MaxClients: cfg.MaxClients, MaxHeads: max(16384, 4*cfg.MaxClients), MaxHeadsPerSource: cfg.MaxConnPerIP,
			RequestTimeout: cfg.RequestTimeout, MaxHeader: cfg.MaxHeader, Local: cfg.Redirect(),
			Access: access,
		},
		Route: f.sched.Route, Sender: f.sender, Metrics: m, Log: f.log,
	}
	m.Registry.MustRegister(collector{f}, m.HandoffDuration)
	ok = true
	f.log.Info("front end ready", "op", "start", "vip", vip.String(), "vip_owner", string(cfg.VIP), "interface", link.Attrs().Name,
		"servers", len(cfg.Servers), "rules", len(cfg.Rules))
	return f, nil
}

// SetReader reads the FE table's flow sets (nft.Reader).
type SetReader interface {
	Members(set string) (map[netip.AddrPort]netip.Addr, error)
	Has(set string, flow netip.AddrPort) (bool, error)
}

// newReaper is the reaper of the FE's connection table: its removals are
// conditional on the table, checked by the forwarding's owner in order
// with the handoffs' edits; its reads go to sets.
func (f *FE) newReaper(sets SetReader) *conntab.Reaper {
	cfg := f.cfg
	skipped := func(err error) error {
		if errors.Is(err, nft.ErrSkipped) {
			return conntab.ErrSkippedEdit
		}
		return err
	}
	return &conntab.Reaper{
		Table: f.table,
		Unforward: func(ctx context.Context, flow netip.AddrPort, still func() bool) error {
			return skipped(f.flows.UnforwardIf(ctx, flow, still))
		},
		Remove: func(ctx context.Context, flow netip.AddrPort, still func() bool) error {
			return skipped(f.flows.Remove(ctx, flow, still))
		},
		Forwarded: func(context.Context) (map[netip.AddrPort]netip.Addr, error) {
			return sets.Members(nft.MapForward)
		},
		Forwarding: func(_ context.Context, flow netip.AddrPort) (bool, error) {
			return sets.Has(nft.MapForward, flow)
		},
		Alive: func(_ context.Context, flow netip.AddrPort) (bool, error) {
			return sets.Has(nft.SetAlive, flow)
		},
		Idle: cfg.IdleTimeout, Tick: min(time.Second, cfg.TimeWait),
		IdleEvery: min(max(cfg.IdleTimeout/4, time.Second), time.Minute), Log: f.log,
	}
}

// flowCapacity is how many connections the FE tracks at most: its sets'
// size, less a sixteenth for marks the kernel has yet to collect and
// ports reused while their previous connection is forwarded.
func flowCapacity(rs *nft.Ruleset) int {
	size := int(rs.Set(nft.MapForward).Size)
	return size - size/16
}

// installTable installs the FE's table, taking over the forwarding a
// previous agent left in the kernel (it crashed, or handed over with
// SIGQUIT) in the same transaction, so its clients never notice. The native
// queue expression is tried first; a kernel without nft_queue refuses it
// when the batch is committed, and the xtables target is used instead.
func (f *FE) installTable() error {
	cfg := f.cfg
	carried, err := nft.ReadCarried(f.owned.Conn, nft.FE(nft.FEParams{}).Table)
	if err != nil {
		return fmt.Errorf("read the previous agent's flows: %w", err)
	}
	if f.place != nil {
		// The kernel owns every pin: the flows are carried into the new
		// table, not into the connection table.
		rs, err := f.installPlace(f.owned.Conn, carried)
		if err != nil {
			return fmt.Errorf("install the FE's placing table: %w", err)
		}
		f.owned.Rules, f.adopted = rs, carried.Found
		f.log.Info("placing table installed (accept = be)", "op", "start", "carried", len(carried.Forward))
		return nil
	}
	inst, err := nft.InstallFE(f.owned.Conn, f.tableParams(), carried.Init(), nft.QueuePreference)
	if err != nil {
		return fmt.Errorf("install the FE's table: %w", err)
	}
	f.owned.Rules, f.qmode, f.adopted = inst.Ruleset, inst.Queue, carried.Found
	f.log.Info("NFQUEUE rule installed", "op", "start", "queue", cfg.QueueNum, "via", inst.Queue.String(),
		"refused", inst.Refused)
	adopt(f.table, carried, cfg.TimeWait, time.Now())
	if len(carried.Forward) > 0 {
		f.log.Info("adopted the previous agent's handed-off connections", "op", "start",
			"forwarded", len(carried.Forward), "closing", len(carried.Closing))
	}
	return nil
}

// tableParams are the FE table's parameters for the config.
func (f *FE) tableParams() nft.FEParams {
	cfg := f.cfg
	return nft.FEParams{
		VIP: cfg.VAddr, Port: cfg.Port, TLSPort: cfg.TLSPort,
		FreshTimeout: cfg.RequestTimeout + time.Duration(len(cfg.Servers)+1)*cfg.HandoffTimeout + 5*time.Second,
		TimeWait:     cfg.TimeWait, IdleTimeout: cfg.IdleTimeout,
		// At ~4k handoffs/s (docs/performance.md) a 10 s TIME_WAIT alone
		// holds 40k flows: size the sets well above the 65535 default.
		Size:     uint32(max(1<<18, 4*cfg.MaxClients)),
		QueueNum: cfg.QueueNum,
	}
}

// adopt takes a predecessor's forwarded flows into the connection table:
// HANDOFFED, or TIME_WAIT for timeWait from now when the predecessor had
// seen them close, so that the reaper ends their forwarding in time.
func adopt(table *conntab.Table, carried *nft.Carried, timeWait time.Duration, now time.Time) {
	for k, be := range carried.Forward {
		state, until := conntab.Handoffed, time.Time{}
		if carried.Closing[k] {
			state, until = conntab.TimeWait, now.Add(timeWait)
		}
		table.Adopt(k, be, state, now, until)
	}
}

// waitSessions waits up to d for a session to every BE, so the first
// clients after a start do not find every BE unreachable. BEs still without
// one are logged and stay unavailable until their sessions come up.
func (f *FE) waitSessions(d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		var missing []string
		for _, srv := range f.sched.Servers() {
			if len(f.pool.Sessions(srv.AddrPort())) == 0 {
				missing = append(missing, srv.AddrPort().String())
			}
		}
		if len(missing) == 0 {
			return
		}
		if time.Now().After(deadline) {
			f.log.Warn("starting without control sessions to some BEs", "op", "start", "bes", strings.Join(missing, " "))
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// changed applies one observation of be (a session's coming or going, a
// probe) and logs the BE's availability when it changes, once.
func (f *FE) changed(be netip.Addr, apply func(netip.Addr, bool) (backends.Change, error), ok bool, why error) {
	c, err := apply(be, ok)
	if err != nil || !c.Changed {
		return
	}
	f.kickCluster()
	switch {
	case c.Available:
		f.log.Info("BE available", "op", "detect", "be", be.String())
	case f.released.Load():
		// Release closed the sessions (a stop, an upgrade): nothing is
		// wrong with the BE, and a normal stop must not warn (issue 18).
		f.log.Debug("BE not available: the FE let go of its sessions", "op", "stop", "be", be.String(), "err", why)
	default:
		f.log.Warn("BE not available", "op", "detect", "be", be.String(), "err", why)
	}
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// run serves clients until serve is done; the kernel-facing loops (flow
// updates, expiry) go on until keep is done, and the queue reader until
// the FE is released, so that handed-off connections can drain in between.
func (f *FE) Run(serve, keep context.Context) {
	loops, stop := context.WithCancel(keep)
	defer stop()
	f.startLoops(serve, loops)
	f.front.ServeWithTLS(serve, keep, f.ln, f.tlsLn)
	close(f.served)
	f.loops.Wait()
}

// startLoops starts the loops beside the clients': those that follow the
// kernel and the BEs until loops ends, and those that serve (the cluster
// frame, detection) until serve does.
func (f *FE) startLoops(serve, loops context.Context) {
	loops, stop := context.WithCancel(loops)
	f.loopsMu.Lock()
	f.stopLoops = stop
	f.loopsMu.Unlock()
	f.loops.Go(func() { f.flows.Run(loops) })
	if f.owned.Rules != nil { // nil in the unit tests: no kernel
		f.loops.Go(func() { f.guard().Run(loops) })
	}
	// Only the FE that holds the VIP ends flows (sync.go): always, without
	// syncpeer.
	f.loops.Go(func() {
		// With accept = be the kernel expires every pin, and a flow the
		// connection table does not know is not an orphan: only moved
		// flows' rows are kept, while their pins last.
		if f.place == nil {
			f.whileActive(loops, f.reaper.Run)
		} else {
			f.keepPins(loops, max(f.cfg.TimeWait, time.Second))
		}
		if f.setsc != nil {
			f.setsc.CloseLasting()
		}
	})
	f.loops.Go(func() { f.clusterLoop(serve) })
	f.loops.Go(func() { f.whileActive(loops, f.heldLoop) })
	f.loops.Go(func() { f.statsLoop(serve) })
	f.loops.Go(func() { f.syncLoops(loops) })
	// Always: detection may be turned on later (tcphactl dtcinterval, a
	// reload) after a start with dtcinterval = 0.
	f.loops.Go(func() { f.detectLoop(serve) })
	if f.regSrv != nil {
		f.loops.Go(func() {
			if err := f.regSrv.Serve(loops, f.regLn); err != nil {
				f.log.Error("registration listener stopped", "op", "register", "err", err)
			}
		})
	}
}

// Alive tells whether the FE's loops that can hang still turn (the agent
// feeds systemd's watchdog on it): the flow owner, the one goroutine on
// the nftables handle that every handoff's commit waits for, answers a
// read of the kernel's counters before ctx ends; and the accept loop has
// not ended.
func (f *FE) Alive(ctx context.Context) error {
	select {
	case <-f.served:
		return errors.New("the FE no longer accepts clients")
	default:
	}
	if _, _, err := f.flows.Forwarded(ctx); err != nil {
		return fmt.Errorf("the flow owner does not answer: %w", err)
	}
	return nil
}

// Linger waits up to d for the work a handover left here (relays to the
// local node, handoffs that did not finish in time).
func (f *FE) Linger(d time.Duration) {
	select {
	case <-f.served:
	case <-time.After(d):
		f.log.Warn("cutting connections that were not handed over", "op", "upgrade")
	}
}

// HandOver stops the FE's work for a successor that shares its VIP
// listener: it stops accepting, takes the clients still sending their heads
// from their goroutines, lets the handoffs under way finish, and stops the
// kernel-facing loops. Work that does not finish in time (a handoff stuck
// on a BE; a relay to the local node) stays with this process.
func (f *FE) HandOver(stopServe func()) []frontend.HandedHead {
	stopServe()
	ctx, cancel := context.WithTimeout(context.Background(), 2*f.cfg.HandoffTimeout+time.Second)
	heads := f.front.Handover(ctx)
	f.stopMoves(ctx)
	cancel()
	// The BEs' moves and switches go to the successor's sessions from now
	// on: this agent would answer them busy.
	for _, be := range f.pool.Peers() {
		for _, s := range f.pool.Sessions(be) {
			s.GoAway()
		}
	}
	f.loopsMu.Lock()
	if f.stopLoops != nil {
		f.stopLoops()
	}
	f.loopsMu.Unlock()
	f.loops.Wait()
	return heads
}

// Drain waits up to d until no handed-off connection is live: TIME_WAIT
// rows are closed connections and wait for nobody. Those still live then
// are reset: each BE is told to send its client a RST, so that neither end
// hangs once this FE stops forwarding.
func (f *FE) Drain(d time.Duration) {
	if !f.active() {
		// A standby's rows are the peer's live connections: not its to
		// reset.
		return
	}
	deadline := time.Now().Add(d)
	for f.draining() && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	left := f.drainLeft()
	if len(left) == 0 {
		return
	}
	f.log.Warn("drain time over; resetting the connections left", "op", "stop", "connections", len(left))
	resets, unknown := resetPlan(left, f.sched.Servers())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var failed atomic.Int64
	failed.Add(int64(unknown))
	for _, r := range resets {
		wg.Go(func() {
			if err := f.client.Reset(ctx, r.BE, r.Client); err != nil {
				failed.Add(1)
				f.log.Debug("reset not done", "op", "stop", "client", r.Client.String(), "err", err)
			}
		})
	}
	wg.Wait()
	f.log.Info("connections reset", "op", "stop", "reset", int64(len(left))-failed.Load(), "not_reached", failed.Load())
}

// reset is one client a BE is told to reset.
type reset struct{ BE, Client netip.AddrPort }

// resetPlan is which BE resets each connection left at the end of a
// drain: the one it was handed to, at that BE's control port. unknown
// counts those whose BE is no longer among servers (a reload or a
// deregistration took it away): nobody can be asked.
func resetPlan(left []conntab.Conn, servers []backends.Server) (resets []reset, unknown int) {
	ports := map[netip.Addr]netip.AddrPort{}
	for _, srv := range servers {
		ports[srv.Addr] = srv.AddrPort()
	}
	for _, c := range left {
		be, ok := ports[c.BE]
		if !ok {
			unknown++
			continue
		}
		resets = append(resets, reset{BE: be, Client: c.Client})
	}
	return resets, unknown
}

// draining tells whether a stopping FE still has connections to wait for
// (drainLeft; with accept = fe, this FE's live count of each BE).
func (f *FE) draining() bool {
	if f.acceptBE() && f.place != nil {
		return len(f.drainLeft()) > 0
	}
	n := 0
	for _, srv := range f.sched.Servers() {
		n += f.table.Live(srv.Addr)
	}
	return n > 0
}

// drainLeft are the connections a stopping FE waits for and then resets:
// with accept = fe its live rows; with accept = be the kernel's pins whose
// client has not closed (livePins), placed and moved alike. A moved
// flow's row there outlives its connection while its pin lasts (for a
// reinstall), so waiting on rows made a stop wait out the drain for
// connections already closed, and not at all for placed ones.
func (f *FE) drainLeft() []conntab.Conn {
	if !f.acceptBE() || f.place == nil {
		return f.liveRows()
	}
	pins, err := f.place.livePins()
	if err != nil {
		f.log.Warn("drain: the kernel's pins not read; waiting on the table's rows", "op", "stop", "err", err)
		return f.liveRows()
	}
	return pins
}

// liveRows are the connections handed off, or being handed off, to a BE.
func (f *FE) liveRows() []conntab.Conn {
	var out []conntab.Conn
	for _, c := range f.table.Snapshot() {
		if (c.State == conntab.Handoffed || c.State == conntab.Handoffing) && c.BE.IsValid() {
			out = append(out, c)
		}
	}
	return out
}

// detectLoop is the seed's BE detection (4.9): a probe every dtcinterval
// (0: none), answered with whether the BE's web server answers and its
// load. [fe] fall failures in a row make a BE unavailable, rise successes
// available again.
func (f *FE) detectLoop(ctx context.Context) {
	for {
		d := time.Duration(f.dtc.Load())
		wait := d
		if d <= 0 {
			wait = time.Second // off: look again for a new interval
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		if d <= 0 {
			continue
		}
		var wg sync.WaitGroup
		for _, srv := range f.sched.Servers() {
			wg.Go(func() { f.probe(ctx, srv.AddrPort(), min(d, 2*time.Second)) })
		}
		wg.Wait()
		if f.acceptBE() {
			// The BEs' lard and wlc see the new view; an unchanged one
			// goes out too: it resets what each BE counted since.
			f.takeLoads()
			f.kickCluster()
		}
	}
}

// judge is a probe's verdict: a BE is good when it answered, is not
// stopping, and its web server passes the check (the BE's log says what
// it answered).
func judge(h wire.Health, err error, check []byte) error {
	switch {
	case err != nil:
		return err
	case h.Draining:
		return errors.New("it is stopping")
	case !h.ServerUp:
		return fmt.Errorf("its web server fails the check %s", check)
	}
	return nil
}

// probe probes one BE and records the result.
func (f *FE) probe(ctx context.Context, be netip.AddrPort, timeout time.Duration) {
	pctx, cancel := context.WithTimeout(ctx, timeout)
	check := *f.check.Load()
	h, err := f.client.Probe(pctx, be, check)
	cancel()
	if ctx.Err() != nil {
		return
	}
	err = judge(h, err, check)
	result := "ok"
	if err != nil {
		result = "failed"
	}
	f.m.Probes.WithLabelValues(be.Addr().String(), result).Inc()
	why := ""
	if err != nil {
		why = err.Error()
	}
	f.changed(be.Addr(), func(a netip.Addr, ok bool) (backends.Change, error) {
		return f.sched.Probe(a, ok, int(h.Active), why, time.Now())
	}, err == nil, err)
}

// setCheck sets the check the probes ask for; a config not made by
// config.Parse (tests) may have none: the default then.
func (f *FE) setCheck(c backends.Check) {
	if c.Method == "" {
		c = backends.DefaultCheck
	}
	b, _ := c.MarshalText()
	f.check.Store(&b)
}

// Stop undoes what Start did; Keep instead leaves the table and the VIP
// for the next agent. Both are idempotent.
func (f *FE) Stop() error {
	f.Release()
	return errors.Join(f.vip.Remove(), f.owned.Remove())
}

// Keep lets go of the FE's sockets and leaves its table and VIP.
func (f *FE) Keep() {
	f.Release()
	f.owned.Keep()
}

// Release closes what only one agent may hold: the listeners, the
// sessions, the queue.
func (f *FE) Release() {
	f.released.Store(true)
	if f.ln != nil {
		f.ln.Close()
	}
	if f.tlsLn != nil {
		f.tlsLn.Close()
	}
	if f.regLn != nil {
		f.regLn.Close()
	}
	if f.pool != nil {
		f.pool.Close()
	}
	if f.sync != nil {
		f.sync.pool.Close()
	}
	if f.reader != nil {
		f.reader.Close()
	}
}

// Status is the FE's part of `tcphactl status`. Its JSON follows
// tcphactl(8)'s rules: snake_case keys, durations in seconds (*_seconds),
// addresses without their ports (a port is a number of its own), lists
// never null.
type Status struct {
	VIP  string `json:"vip"`
	Port uint16 `json:"port"`
	// TLSPort is the VIP's TLS port ([fe] tlsport), 0 when off.
	TLSPort     uint16         `json:"tls_port"`
	Queue       uint16         `json:"queue"`
	QueueVia    string         `json:"queue_via"`
	Counters    counters       `json:"counters"`
	AvgHandoff  float64        `json:"avg_handoff_seconds"`
	Connections map[string]int `json:"connections"`
	Queued      int64          `json:"queued"`
	QueuedBy    []queuedBy     `json:"queued_by"`
	Backends    []beLine       `json:"backends"`
	// Moved and NotMoved count the migrations BEs asked for (phttp =
	// multi) that this FE carried out, and those it did not.
	Moved    int64           `json:"moved"`
	NotMoved int64           `json:"not_moved"`
	Table    nft.TableStatus `json:"table"`
	// Sync is the flow sync with the other FE, with [fe] syncpeer.
	Sync *syncStatus `json:"sync,omitempty"`
	avg  time.Duration
}

// counters are frontend.Counters as tcphactl names them.
type counters struct {
	Accepted    int64 `json:"accepted"`
	HandedOff   int64 `json:"handed_off"`
	Local       int64 `json:"local"`
	Answered503 int64 `json:"answered_503"`
	BadRequests int64 `json:"bad_request"`
	TooLarge    int64 `json:"too_large"`
	Timeouts    int64 `json:"timeout"`
	ClosedEarly int64 `json:"closed_early"`
	RefusedBusy int64 `json:"refused_busy"`
}

// queuedBy counts the packets the queue saw of one kind ("event=rst").
type queuedBy struct {
	Label   string `json:"label"`
	Packets int64  `json:"packets"`
}

type beLine struct {
	Addr     string `json:"addr"`
	Port     uint16 `json:"port"`
	State    string `json:"state"`
	Sessions int    `json:"sessions"`
}

// Status reads the FE's counters and its BEs' state.
func (f *FE) Status() Status {
	s := f.front.Stats()
	avg := time.Duration(0)
	if s.HandoffLatencyCount > 0 {
		avg = s.HandoffLatencySum / time.Duration(s.HandoffLatencyCount)
	}
	st := Status{
		VIP: f.cfg.VAddr.String(), Port: f.cfg.Port, TLSPort: f.cfg.TLSPort, Queue: f.cfg.QueueNum, QueueVia: f.qmode.String(),
		Counters: counters{Accepted: s.Accepted, HandedOff: s.HandedOff, Local: s.Local, Answered503: s.Answered503,
			BadRequests: s.BadRequests, TooLarge: s.TooLarge, Timeouts: s.Timeouts, ClosedEarly: s.ClosedEarly,
			RefusedBusy: s.RefusedBusy},
		AvgHandoff: avg.Seconds(), avg: avg, Connections: map[string]int{}, Queued: f.obs.Total(),
		QueuedBy: []queuedBy{}, Backends: []beLine{}, Moved: f.moved.Load(), NotMoved: f.notMoved.Load(),
		Table: f.reinstalls.Status(), Sync: f.syncStatus(),
	}
	counts := f.table.Count()
	for _, k := range []conntab.State{conntab.Handoffing, conntab.Handoffed, conntab.TimeWait} {
		st.Connections[strings.ToLower(k.String())] = counts[k]
	}
	for _, c := range f.obs.Counts() {
		st.QueuedBy = append(st.QueuedBy, queuedBy{Label: c.Label, Packets: c.N})
	}
	st.Backends = f.statusBackends()
	return st
}

// statusBackends are the BE lines of `tcphactl status`.
func (f *FE) statusBackends() []beLine {
	out := []beLine{}
	for _, b := range f.sched.Statuses() {
		state := "up"
		switch {
		case b.Maint:
			state = "maint"
		case !b.Available:
			state = "down"
			if b.LastError != "" {
				state += " (" + b.LastError + ")"
			}
		case b.Draining:
			state = "draining"
		}
		out = append(out, beLine{Addr: b.Addr, Port: b.Port, State: state,
			Sessions: len(f.pool.Sessions(b.Server.AddrPort()))})
	}
	return out
}

// Write writes st as `tcphactl status` shows it.
func (st Status) Write(w io.Writer, pid int) {
	c := st.Counters
	vip := netip.MustParseAddr(st.VIP)
	tls := ""
	if st.TLSPort != 0 {
		tls = " tls=" + netip.AddrPortFrom(vip, st.TLSPort).String()
	}
	fmt.Fprintf(w, "fe vip=%s%s pid=%d queue=%d via %s\n", netip.AddrPortFrom(vip, st.Port), tls, pid, st.Queue, st.QueueVia)
	fmt.Fprintf(w, "  accepted=%d handed_off=%d local=%d answered_503=%d bad_request=%d too_large=%d timeout=%d closed_early=%d refused_busy=%d avg_handoff=%s\n",
		c.Accepted, c.HandedOff, c.Local, c.Answered503, c.BadRequests, c.TooLarge, c.Timeouts, c.ClosedEarly, c.RefusedBusy, st.avg)
	fmt.Fprintf(w, "  connections: handoffing=%d handoffed=%d time_wait=%d moved=%d not_moved=%d\n",
		st.Connections["handoffing"], st.Connections["handoffed"], st.Connections["time_wait"], st.Moved, st.NotMoved)
	fmt.Fprintf(w, "  queued=%d", st.Queued)
	for _, q := range st.QueuedBy { // sorted by label (queue.Observer)
		fmt.Fprintf(w, " %s:%d", q.Label, q.Packets)
	}
	fmt.Fprintln(w)
	for _, b := range st.Backends {
		fmt.Fprintf(w, "  be %s:%d: %s, control sessions %d\n", b.Addr, b.Port, b.State, b.Sessions)
	}
	st.Table.Write(w)
	if s := st.Sync; s != nil {
		role, session := "standby", "down"
		if s.Active {
			role = "active"
		}
		if s.Session {
			session = "up"
		}
		fmt.Fprintf(w, "  sync peer=%s %s session=%s flows=%d pending=%d lag=%.3fs sent_batches=%d resyncs=%d failures=%d applied=%d refused=%d\n",
			s.Peer, role, session, s.Flows, s.Pending, s.Lag, s.Batches, s.Resyncs, s.Failures, s.Applied, s.Refused)
		if s.LastResync != "" || s.LastResyncIn != "" {
			fmt.Fprintf(w, "  sync last_resync_sent=%s last_resync_received=%s\n", orNever(s.LastResync), orNever(s.LastResyncIn))
		}
	}
}

// Reload applies a re-read [fe]: rules, servers, weights and scheduler
// swap in whole for new connections; the detection and handoff timings
// change at once. What needs an upgrade is config.Unreloadable's to say.
func (f *FE) Reload(next *config.FE) {
	old := f.sched.Servers()
	f.sched.SetTable(next.Table())
	f.sched.SetRiseFall(next.Rise, next.Fall)
	add, remove := sessionChanges(old, f.sched.Servers())
	for _, be := range add {
		f.pool.Add(be)
	}
	for _, be := range remove {
		f.pool.Remove(be)
	}
	f.dtc.Store(int64(next.DtcInterval))
	f.setCheck(next.Check)
	f.sender.SetTimeout(next.HandoffTimeout)
	f.phttp.Store(uint32(phttpMode(next.PHTTP)))
	f.kickCluster()
	f.log.Info("scheduling reloaded", "op", "reload", "servers", len(next.Servers), "rules", len(next.Rules),
		"scheduler", string(next.Scheduler))
}

// sessionChanges is which BEs' control sessions a change of servers from
// old to now opens (a new server entry, or a new weight: Add of a peer
// already kept does nothing) and closes (an address:port gone).
func sessionChanges(old, now []backends.Server) (add, remove []netip.AddrPort) {
	for _, srv := range now {
		if !slices.Contains(old, srv) {
			add = append(add, srv.AddrPort())
		}
	}
	for _, srv := range old {
		if !slices.ContainsFunc(now, func(x backends.Server) bool { return x.AddrPort() == srv.AddrPort() }) {
			remove = append(remove, srv.AddrPort())
		}
	}
	return add, remove
}

// Resume serves a client a predecessor handed over while it was still
// sending its request head.
func (f *FE) Resume(ctx context.Context, h frontend.HandedHead) { f.front.Resume(ctx, h) }

// Sockets are the FE's listening sockets and registered BEs, for a
// successor.
func (f *FE) Sockets() Listeners {
	return Listeners{VIP: f.ln, TLS: f.tlsLn, Register: f.regLn, Registered: f.sched.Registrations()}
}
