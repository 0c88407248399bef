package agent

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"tcpha/admin"
	"tcpha/be"
	"tcpha/config"
	"tcpha/fe"
	"tcpha/internal/version"

	"golang.org/x/sys/unix"
)

// command carries out one admin request (admin.Handler).
func (r *runner) command(req admin.Request) (any, string, error) {
	cmd, args := req.Cmd, req.Args
	var v any
	var text strings.Builder
	switch cmd {
	case "status":
		st := r.status()
		v = st
		st.write(&text)
	case "conns":
		if r.f == nil && r.b == nil {
			return nil, "", errors.New("conns: this host has no fe or be role")
		}
		var feConns, beConns any
		if r.f != nil {
			feConns, _ = r.f.Command(cmd, args, &text)
		}
		if r.b != nil {
			if r.f != nil {
				text.WriteString("\nbe:\n")
			}
			flt, err := admin.ParseConnFilter(args)
			if err != nil {
				return nil, "", err
			}
			beConns = r.b.Conns(&text, flt)
		}
		switch {
		case r.f != nil && r.b != nil:
			v = map[string]any{"fe": feConns, "be": beConns}
		case r.f != nil:
			v = feConns
		default:
			v = beConns
		}
	case "backends", "dtcinterval", "drain", "enable", "weight", "maint", "ready", "kill", "rules", "rates", "clear":
		if r.f == nil {
			return nil, "", fmt.Errorf("%s: this host has no fe role", cmd)
		}
		var err error
		if v, err = r.f.Command(cmd, args, &text); err != nil {
			return nil, "", err
		}
	case "loglevel":
		n, err := strconv.Atoi(args[0])
		if err != nil || n < 0 || n > 6 {
			return nil, "", fmt.Errorf("loglevel %q: want 0 to 6", args[0])
		}
		r.lg.SetLevel(n)
		r.log.Info("log level changed", "op", "admin", "loglevel", n)
		v = map[string]int{"loglevel": n}
		fmt.Fprintf(&text, "loglevel %d\n", n)
	case "reload":
		done := make(chan error, 1)
		select {
		case r.reloads <- done:
		case <-time.After(3 * time.Second):
			return nil, "", errors.New("reload: the agent is busy (stopping or handing over)")
		}
		if err := <-done; err != nil {
			return nil, "", err
		}
		v = map[string]string{"reloaded": r.cfg.File}
		fmt.Fprintf(&text, "reloaded %s\n", r.cfg.File)
	}
	return v, text.String(), nil
}

// started is when this agent process started, for its uptime (an
// upgraded agent's is its own).
var started = time.Now()

// agentStatus is `tcphactl status`.
type agentStatus struct {
	PID     int        `json:"pid"`
	Version string     `json:"version"`
	Started time.Time  `json:"started"`
	Uptime  float64    `json:"uptime_seconds"`
	FE      *fe.Status `json:"fe,omitempty"`
	BE      *be.Status `json:"be,omitempty"`
}

func (r *runner) status() agentStatus {
	st := agentStatus{PID: os.Getpid(), Version: version.String(), Started: started,
		Uptime: time.Since(started).Truncate(time.Second).Seconds()}
	if r.f != nil {
		s := r.f.Status()
		st.FE = &s
	}
	if r.b != nil {
		s := r.b.Status()
		st.BE = &s
	}
	return st
}

func (st agentStatus) write(w io.Writer) {
	fmt.Fprintf(w, "tcpha-agent %s pid=%d up %s since %s\n", st.Version, st.PID,
		time.Duration(st.Uptime)*time.Second, st.Started.Format(time.RFC3339))
	if st.FE != nil {
		st.FE.Write(w, st.PID)
	}
	if st.BE != nil {
		st.BE.Write(w, st.PID)
	}
}

// reloadNow re-reads the config file and applies what can change while
// the agent runs; a file that does not parse changes nothing.
func (r *runner) reloadNow(notify func(string)) error {
	if notify != nil {
		notify(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", monotonicUsec()))
		defer notify("READY=1")
	}
	if err := r.lg.Reopen(); err != nil {
		r.log.Error("reopen the log file", "op", "reload", "err", err)
	}
	if r.access != nil {
		// At the path it was opened at: a new accesslog takes an upgrade.
		if err := r.access.Reopen(); err != nil {
			r.log.Error("reopen the access log", "op", "reload", "err", err)
		}
	}
	next, err := config.Load(r.cfg.File)
	if r.m != nil {
		r.m.ObserveReload(err == nil, time.Now())
	}
	if err != nil {
		r.log.Error("reload refused: the running config stays", "op", "reload", "err", err)
		return fmt.Errorf("reload refused, the running config stays: %w", err)
	}
	fixed := config.Unreloadable(r.cfg, next)
	logWarnings(r.log, "reload", next)
	r.lg.SetLevel(next.Global.LogLevel)
	if r.f != nil && next.FE != nil {
		r.f.Reload(next.FE)
	}
	if r.b != nil && next.BE != nil {
		r.b.Reload(next.BE)
	}
	if len(fixed) > 0 {
		r.log.Warn("reloaded; these changes take effect with an upgrade (tcpha-agent -upgrade, or SIGUSR2)",
			"op", "reload", "keys", strings.Join(fixed, ", "))
	} else {
		r.log.Info("reloaded", "op", "reload", "file", r.cfg.File)
	}
	return nil
}

// monotonicUsec is CLOCK_MONOTONIC in microseconds, as systemd's RELOADING
// notification wants it.
func monotonicUsec() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano() / 1000
}
