// Package agent runs tcpha's roles on one host: the FE, the BE, or both,
// as the config's sections say. It wires the pure packages (config,
// backends, handoff) to the kernel adapters (nft, repair, links) and owns
// their lifetimes: what it installs at start it removes at stop.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"tcpha/admin"
	"tcpha/be"
	"tcpha/config"
	"tcpha/fe"
	"tcpha/frontend"
	"tcpha/handover"
	"tcpha/internal/accesslog"
	"tcpha/metrics"
)

// Options are how an agent was started and is asked to stop. Its context
// ending (SIGTERM, SIGINT) stops it with a drain.
type Options struct {
	// Inherited, when set, is what a predecessor handed over: this agent
	// is its successor (tcpha-agent -upgrade, or a start that found an
	// agent handing over).
	Inherited *handover.Inherited
	// Quit (SIGQUIT) asks the agent to hand over: it goes on serving until
	// a new agent takes its sockets over the admin socket, or [global]
	// handoverwait passes; then it exits and leaves its tables and VIP in
	// the kernel.
	Quit <-chan struct{}
	// Ready, if set, is called once the roles serve.
	Ready func()
	// Reload (SIGHUP) re-reads the config file and reopens the log file
	// and the access log.
	Reload <-chan struct{}
	// Notify, if set, is told of reloads (systemd's RELOADING and READY)
	// and feeds the watchdog (WATCHDOG=1).
	Notify func(state string)
	// Watchdog is systemd's WatchdogSec (0: off). The main loop feeds it
	// while the roles' loops answer (watchdog.go).
	Watchdog time.Duration
}

// Run starts the roles cfg asks for and serves until ctx is done (then it
// drains and cleans up), or until a successor takes over (then it hands
// over, and the kernel state stays).
func Run(ctx context.Context, cfg *config.Config, lg *Logger, opt Options) (err error) {
	log := lg.Logger
	r := &runner{cfg: cfg, lg: lg, log: log, handovers: make(chan handoverReq), reloads: make(chan chan error)}
	// The access log outlives the roles: closed (flushed) after they stop.
	var access func(accesslog.Entry)
	if path := cfg.Global.AccessLog; path != "" {
		w, err := accesslog.Open(path, func(err error) { log.Error("access log lines lost", "op", "accesslog", "err", err) })
		if err != nil {
			return err
		}
		defer w.Close()
		r.access, access = w, w.Log
	}
	keepState := false
	defer func() {
		if cerr := r.stop(keepState); cerr != nil {
			log.Error("cleanup incomplete", "op", "stop", "err", cerr)
			err = errors.Join(err, cerr)
		}
	}()
	// keep outlives ctx by the drain: the kernel-facing loops must follow
	// the connections that are still finishing.
	keep, stopKeep := context.WithCancel(context.Background())
	defer stopKeep()
	serve, stopServe := context.WithCancel(ctx)
	defer stopServe()
	log.Debug("file descriptor limit", "op", "start", "nofile", raiseNoFile())
	logWarnings(log, "start", cfg)
	r.m = metrics.New()
	in := opt.Inherited
	if in == nil {
		// The admin socket first: it refuses to start a second agent on
		// the same path before that agent could touch the first one's
		// kernel state.
		if err := r.listen(keep); err != nil {
			return err
		}
	}
	// BE first: a host that is both serves handoffs before it takes
	// clients. A successor's BE takes its predecessor's sessions at once;
	// its FE must wait until the predecessor has let go of the queue and
	// the table.
	if cfg.BE != nil {
		var ln net.Listener
		if in != nil {
			ln, in.Control = in.Control, nil
		}
		if r.b, err = be.Start(serve, cfg.BE, cfg.Global.Secret, r.m, log, ln, access); err != nil {
			return err
		}
		if in != nil && in.BEVIP != nil {
			// accept = be: the predecessor's VIP:port listener, with the
			// connections waiting in its backlog.
			r.b.AcceptOn(in.BEVIP)
			in.BEVIP = nil
		}
		r.wg.Go(func() { r.b.Run(keep) })
	}
	var heads []frontend.HandedHead
	if in != nil {
		if err := in.Go(); err != nil {
			in.Close()
			return fmt.Errorf("upgrade: %w", err)
		}
		// The predecessor's relayed connections resume here as they come;
		// its clients still sending their heads wait for this FE.
		released := make(chan struct{})
		var mu sync.Mutex
		var pending []frontend.HandedHead
		relayed, feUp := 0, false
		take := func(h handover.Handed) {
			mu.Lock()
			defer mu.Unlock()
			switch {
			case h.Head != nil && cfg.FE != nil && !feUp:
				pending = append(pending, *h.Head)
			case h.Relay != nil && r.b != nil:
				if err := r.b.Resume(*h.Relay); err != nil {
					log.Warn("a handed-over connection could not resume", "op", "upgrade", "err", err)
					h.Close()
					return
				}
				relayed++
			default:
				h.Close()
			}
		}
		r.wg.Go(func() {
			err := in.Receive(take, func() { close(released) })
			mu.Lock()
			log.Info("took over from the previous agent", "op", "upgrade", "relayed", relayed, "err", err)
			mu.Unlock()
		})
		select {
		case <-released:
		case <-time.After(predecessorWait):
			log.Warn("the previous agent has not released the FE's resources; starting anyway", "op", "upgrade")
		}
		mu.Lock()
		heads, pending, feUp = pending, nil, true
		mu.Unlock()
		if err := r.listen(keep); err != nil {
			closeHeads(heads)
			return err
		}
	}
	if cfg.FE != nil {
		var lns fe.Listeners
		if in != nil {
			lns = fe.Listeners{VIP: in.VIP, TLS: in.TLS, Register: in.Register, Registered: in.Registered}
			in.VIP, in.TLS, in.Register = nil, nil, nil
		}
		if r.f, err = fe.Start(serve, cfg.FE, cfg.Global.Secret, r.m, log, lns, access); err != nil {
			closeHeads(heads)
			return err
		}
		r.wg.Go(func() { r.f.Run(serve, keep) })
		for _, h := range heads {
			r.f.Resume(keep, h)
		}
	} else {
		closeHeads(heads)
	}
	if in != nil {
		in.CloseListeners()
	}
	adm := &admin.Server{Handle: r.command, Log: log,
		Successor: func(ctx context.Context, c *net.UnixConn, force bool) {
			select {
			case r.handovers <- handoverReq{conn: c, force: force}: // Run owns c now
			case <-ctx.Done():
				c.Close()
			}
		}}
	r.wg.Go(func() { adm.Serve(keep, r.admin) })

	if opt.Ready != nil {
		opt.Ready()
	}
	var quitting <-chan time.Time
	quit := opt.Quit
	wd := newWatchdog(opt.Watchdog, r.alive, opt.Notify, log)
	wdTicks, stopTicks := wd.ticks()
	defer stopTicks()
	for {
		select {
		case <-wdTicks:
			wd.tick(keep)
		case err := <-wd.verdicts():
			wd.verdict(err)
		case <-ctx.Done():
			log.Info("stopping: draining handed-off connections", "op", "stop")
			r.drain(stopServe)
			stopKeep()
			r.wg.Wait()
			return nil
		case <-opt.Reload:
			r.reloadNow(opt.Notify)
		case done := <-r.reloads:
			done <- r.reloadNow(opt.Notify)
		case <-quit:
			quit = nil
			r.quitting.Store(true)
			quitting = time.After(cfg.Global.HandoverWait)
			log.Info("asked to hand over: waiting for a new agent to take over", "op", "upgrade", "wait", cfg.Global.HandoverWait)
		case <-quitting:
			// Nobody came: leave the kernel state for the next agent, as a
			// crash would.
			log.Warn("no new agent took over; exiting and leaving the tables and the VIP", "op", "upgrade")
			keepState = true
			stopServe()
			stopKeep()
			r.releaseAll()
			r.wg.Wait()
			return nil
		case req := <-r.handovers:
			if !req.force && !r.quitting.Load() {
				handover.Refuse(req.conn, "it was not asked to quit (SIGQUIT); to replace it now, start the new one with -upgrade")
				req.conn.Close()
				continue
			}
			if released, err := r.handOver(req.conn, stopServe); err != nil {
				log.Error("handover failed", "op", "upgrade", "err", err)
				req.conn.Close()
				if released {
					// Past the point of no return: what was released stays
					// released. Exit leaving the kernel state.
					keepState = true
					stopKeep()
					r.wg.Wait()
					return err
				}
				continue
			}
			keepState = true
			r.linger()
			stopKeep()
			r.wg.Wait()
			return nil
		}
	}
}

// linger waits, up to the drain times, for the work a handover left in
// this process.
func (r *runner) linger() {
	var wg sync.WaitGroup
	if r.f != nil {
		wg.Go(func() { r.f.Linger(r.cfg.FE.Drain) })
	}
	if r.b != nil {
		wg.Go(func() { r.b.Linger(r.cfg.BE.Drain) })
	}
	wg.Wait()
}

// predecessorWait bounds how long a successor waits for its predecessor
// to release the FE's resources (it hands over within its own bounds:
// sessions, commits, relays at a safe point, about 20 s at most).
const predecessorWait = 60 * time.Second

func closeHeads(heads []frontend.HandedHead) {
	for _, h := range heads {
		h.Conn.SetLinger(0)
		h.Conn.Close()
	}
}

// runner is one agent's run: its roles and what they share.
type runner struct {
	cfg       *config.Config // as the agent started; a reload applies its changes to the roles
	lg        *Logger
	log       *slog.Logger
	access    *accesslog.Writer // nil without [global] accesslog
	m         *metrics.Metrics
	f         *fe.FE
	b         *be.BE
	admin     net.Listener
	stopMet   func()
	wg        sync.WaitGroup
	quitting  atomic.Bool
	handovers chan handoverReq
	reloads   chan chan error // tcphactl reload
}

type handoverReq struct {
	conn  *net.UnixConn
	force bool // tcpha-agent -upgrade; else only an agent asked to quit hands over
}

// listen opens the admin socket and the metrics and pprof listeners:
// those of which only one agent may hold the address.
func (r *runner) listen(ctx context.Context) error {
	ln, err := admin.Listen(r.cfg.Global.Admin)
	if err != nil {
		return err
	}
	stop, err := metrics.Serve(r.m, r.cfg.Global.Metrics, r.cfg.Global.Pprof, r.log)
	if err != nil {
		ln.Close()
		return err
	}
	r.admin, r.stopMet = ln, stop
	return nil
}

// unlisten closes what listen opened, so that a successor may open it.
func (r *runner) unlisten() {
	if r.admin != nil {
		r.admin.Close()
		r.admin = nil
	}
	if r.stopMet != nil {
		r.stopMet()
		r.stopMet = nil
	}
}

// drain stops taking new work and waits for the work under way, up to the
// roles' drain times.
func (r *runner) drain(stopServe func()) {
	stopServe()
	var dwg sync.WaitGroup
	if r.f != nil {
		dwg.Go(func() { r.f.Drain(r.cfg.FE.Drain) })
	}
	if r.b != nil {
		dwg.Go(func() { r.b.Drain(r.cfg.BE.Drain) })
	}
	dwg.Wait()
}

// releaseAll lets go of everything only one agent may hold.
func (r *runner) releaseAll() {
	if r.f != nil {
		r.f.Release()
	}
	if r.b != nil {
		r.b.Release()
	}
	r.unlisten()
}

// stop removes the roles' kernel state, or leaves it for the next agent.
func (r *runner) stop(keepState bool) error {
	var errs []error
	if keepState {
		if r.f != nil {
			r.f.Keep()
		}
		if r.b != nil {
			r.b.Keep()
		}
		if r.f != nil || r.b != nil {
			r.log.Info("handed over: tables and VIP left for the next agent", "op", "stop")
		}
	} else {
		if r.f != nil {
			errs = append(errs, r.f.Stop())
		}
		if r.b != nil {
			errs = append(errs, r.b.Stop())
		}
	}
	r.unlisten()
	return errors.Join(errs...)
}

// handOver gives this agent's sockets to the successor on c (package
// handover). released says whether it got past the point of no return.
func (r *runner) handOver(c *net.UnixConn, stopServe func()) (released bool, err error) {
	roles := handover.Roles{Log: r.log, Release: func() {
		stopServe()
		r.releaseAll()
	}}
	if r.f != nil {
		lns := r.f.Sockets()
		roles.Listeners = append(roles.Listeners, handover.Listener{Name: handover.ListenerVIP, Ln: lns.VIP})
		if lns.Register != nil {
			roles.Listeners = append(roles.Listeners, handover.Listener{Name: handover.ListenerRegister, Ln: lns.Register})
		}
		if lns.TLS != nil {
			roles.Listeners = append(roles.Listeners, handover.Listener{Name: handover.ListenerTLS, Ln: lns.TLS})
		}
		roles.Registered = lns.Registered
		roles.FE = func() []frontend.HandedHead { return r.f.HandOver(stopServe) }
	}
	if r.b != nil {
		roles.Listeners = append(roles.Listeners, handover.Listener{Name: handover.ListenerControl, Ln: r.b.Listener()})
		if ln := r.b.VIPListener(); ln != nil {
			roles.Listeners = append(roles.Listeners, handover.Listener{Name: handover.ListenerBEVIP, Ln: ln})
		}
		roles.BE = r.b.HandOver
	}
	return handover.Give(c, roles)
}
