// Package agent runs tcpha's roles on one host: the FE, the BE, or both,
// as the config's sections say. It wires the pure packages (config,
// backends, handoff) to the kernel adapters (nft, repair, links) and owns
// their lifetimes: what it installs at start it removes at stop.
package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"tcpha/config"
	"tcpha/metrics"
)

// StopMode is how the agent stops when its context ends.
type StopMode int

const (
	// StopDrain (SIGTERM, SIGINT): stop taking new clients, let handed-off
	// connections finish for up to the configured drain time, then remove
	// the tables and the VIP.
	StopDrain StopMode = iota
	// StopHandover (SIGQUIT): exit at once and leave the tables and the VIP
	// in the kernel; forwarding goes on, and the next agent adopts it.
	StopHandover
)

// Run starts the roles cfg asks for and serves until ctx is done, then
// stops as mode says (it is asked once ctx is done).
func Run(ctx context.Context, cfg *config.Config, log *slog.Logger, mode func() StopMode) (err error) {
	var f *fe
	var b *be
	handover := false
	defer func() {
		var errs []error
		switch {
		case handover:
			if f != nil {
				f.handover()
			}
			if b != nil {
				b.handover()
			}
			log.Info("handed over: tables and VIP left for the next agent", "op", "stop")
		default:
			if f != nil {
				errs = append(errs, f.stop())
			}
			if b != nil {
				errs = append(errs, b.stop())
			}
		}
		if cerr := errors.Join(errs...); cerr != nil {
			log.Error("cleanup incomplete", "op", "stop", "err", cerr)
			err = errors.Join(err, cerr)
		}
	}()
	// The admin socket first: it refuses to start a second agent on the same
	// path before that agent could touch the first one's kernel state.
	admin, err := listenAdmin(cfg.Global.Admin)
	if err != nil {
		return err
	}
	defer admin.Close()
	// keep outlives ctx by the drain: the kernel-facing loops must follow
	// the connections that are still finishing.
	keep, stopKeep := context.WithCancel(context.Background())
	defer stopKeep()
	log.Debug("file descriptor limit", "op", "start", "nofile", raiseNoFile())
	m := metrics.New()
	if err := metrics.Serve(keep, m, cfg.Global.Metrics, cfg.Global.Pprof, log); err != nil {
		return err
	}
	if len(cfg.Global.Secret) == 0 {
		log.Warn("no [global] secret: control sessions are not authenticated; a BE trusts any connection from its feaddr",
			"op", "start")
	}
	// BE first: a host that is both serves handoffs before it takes clients.
	if cfg.BE != nil {
		if b, err = startBE(ctx, cfg.BE, cfg.Global.Secret, m, log); err != nil {
			return err
		}
	}
	if cfg.FE != nil {
		if f, err = startFE(ctx, cfg.FE, cfg.Global.Secret, m, log); err != nil {
			return err
		}
	}
	var wg sync.WaitGroup
	wg.Go(func() { serveAdmin(keep, admin, f, b, log) })
	if b != nil {
		wg.Go(func() { b.run(ctx) })
	}
	if f != nil {
		wg.Go(func() { f.run(ctx, keep) })
	}
	<-ctx.Done()
	handover = mode() == StopHandover
	if !handover {
		log.Info("stopping: draining handed-off connections", "op", "stop")
		var dwg sync.WaitGroup
		if f != nil {
			dwg.Go(func() { f.drain(cfg.FE.Drain) })
		}
		if b != nil {
			dwg.Go(func() { b.drain(cfg.BE.Drain) })
		}
		dwg.Wait()
	}
	stopKeep()
	wg.Wait()
	return nil
}

// NewLogger returns the agent's logger: loglevel is the seed's dbglevel,
// 0-6 (0-1 errors, 2-3 warnings, 4 info, 5-6 debug).
func NewLogger(g config.Global, stderr io.Writer) (*slog.Logger, io.Closer, error) {
	level := slog.LevelDebug
	switch {
	case g.LogLevel <= 1:
		level = slog.LevelError
	case g.LogLevel <= 3:
		level = slog.LevelWarn
	case g.LogLevel == 4:
		level = slog.LevelInfo
	}
	w, closer := stderr, io.Closer(io.NopCloser(nil))
	if g.LogFile != "" {
		f, err := os.OpenFile(g.LogFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			return nil, nil, fmt.Errorf("open logfile: %w", err)
		}
		w, closer = f, f
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})), closer, nil
}

func listenAdmin(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	// A socket file left by a crashed agent is stale only if nobody answers.
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin socket %s: another agent is running there", path)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	os.Chmod(path, 0o600)
	return ln, nil
}

// serveAdmin answers one-line commands on the admin socket: `status`
// and `conns` (the seed's /proc/net/tcpha_fe_conn).
func serveAdmin(ctx context.Context, ln net.Listener, f *fe, b *be, log *slog.Logger) {
	path := ln.Addr().String()
	stop := context.AfterFunc(ctx, func() { ln.Close(); os.Remove(path) })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				log.Error("admin socket", "op", "admin", "err", err)
			}
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			switch cmd := strings.TrimSpace(line); cmd {
			case "status":
				if f != nil {
					f.status(c)
				}
				if b != nil {
					b.status(c)
				}
			case "conns":
				if f == nil {
					fmt.Fprintln(c, "no fe role on this host")
					return
				}
				f.conns(c)
			default:
				fmt.Fprintf(c, "unknown command %q (want status or conns)\n", cmd)
			}
		}()
	}
}
