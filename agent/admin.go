package agent

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"tcpha/config"
	"tcpha/handoff/conntab"

	"golang.org/x/sys/unix"
)

// The admin socket speaks one request per connection: a line
//
//	[json ]COMMAND [ARGS...]
//
// answered by a status line, `ok` or `error: WHY`, and the output. tcphactl
// prints the output and exits non-zero on an error. `upgrade` and
// `takeover` are a successor's (upgrade.go).

func listenAdmin(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	// A socket file left by a crashed agent is stale only if nobody answers.
	if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
		c.Close()
		return nil, fmt.Errorf("admin socket %s: %w", path, ErrAgentRunning)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("admin socket: %w", err)
	}
	os.Chmod(path, 0o600)
	return ln, nil
}

// serveAdmin answers the admin socket's requests until ctx ends.
func serveAdmin(ctx context.Context, ln net.Listener, r *runner) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				r.log.Error("admin socket", "op", "admin", "err", err)
			}
			return
		}
		go func() {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			line, _ := bufio.NewReader(io.LimitReader(c, 4096)).ReadString('\n')
			if cmd := strings.TrimSpace(line); cmd == "upgrade" || cmd == "takeover" {
				// A successor: nothing more comes on the line.
				c.SetDeadline(time.Time{})
				select {
				case r.handovers <- handoverReq{conn: c.(*net.UnixConn), force: cmd == "upgrade"}:
					return // Run owns c now
				case <-ctx.Done():
					c.Close()
					return
				}
			}
			defer c.Close()
			out, err := r.command(strings.Fields(line))
			if err != nil {
				fmt.Fprintf(c, "error: %v\n", err)
				r.log.Info("admin command refused", "op", "admin", "command", strings.TrimSpace(line), "err", err)
				return
			}
			io.WriteString(c, "ok\n"+out)
		}()
	}
}

// errUsage lists the commands.
var errUsage = errors.New("want status, backends, conns, loglevel N, dtcinterval SECONDS, drain ADDR, enable ADDR, " +
	"weight ADDR N or reload, optionally after json")

// command runs one admin request and returns its output.
func (r *runner) command(args []string) (string, error) {
	asJSON := len(args) > 0 && args[0] == "json"
	if asJSON {
		args = args[1:]
	}
	if len(args) == 0 {
		return "", errUsage
	}
	cmd, args := args[0], args[1:]
	nargs := map[string]int{"status": 0, "backends": 0, "conns": 0, "reload": 0, "loglevel": 1,
		"dtcinterval": 1, "drain": 1, "enable": 1, "weight": 2}
	n, ok := nargs[cmd]
	if !ok {
		return "", fmt.Errorf("unknown command %q: %w", cmd, errUsage)
	}
	if len(args) != n {
		return "", fmt.Errorf("%s takes %d argument(s), got %d", cmd, n, len(args))
	}
	var v any
	var text strings.Builder
	switch cmd {
	case "status":
		st := r.status()
		v = st
		st.write(&text)
	case "conns":
		if r.f == nil && r.b == nil {
			return "", errors.New("conns: this host has no fe or be role")
		}
		var fe, be any
		if r.f != nil {
			fe, _ = r.f.command(cmd, args, &text)
		}
		if r.b != nil {
			if r.f != nil {
				text.WriteString("\nbe:\n")
			}
			be = r.b.conns(&text)
		}
		switch {
		case r.f != nil && r.b != nil:
			v = map[string]any{"fe": fe, "be": be}
		case r.f != nil:
			v = fe
		default:
			v = be
		}
	case "backends", "dtcinterval", "drain", "enable", "weight":
		if r.f == nil {
			return "", fmt.Errorf("%s: this host has no fe role", cmd)
		}
		var err error
		if v, err = r.f.command(cmd, args, &text); err != nil {
			return "", err
		}
	case "loglevel":
		n, err := strconv.Atoi(args[0])
		if err != nil || n < 0 || n > 6 {
			return "", fmt.Errorf("loglevel %q: want 0 to 6", args[0])
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
			return "", errors.New("reload: the agent is busy (stopping or handing over)")
		}
		if err := <-done; err != nil {
			return "", err
		}
		v = map[string]string{"reloaded": r.cfg.File}
		fmt.Fprintf(&text, "reloaded %s\n", r.cfg.File)
	}
	if asJSON {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return "", err
		}
		return string(b) + "\n", nil
	}
	return text.String(), nil
}

// agentStatus is `tcphactl status`.
type agentStatus struct {
	PID int       `json:"pid"`
	FE  *feStatus `json:"fe,omitempty"`
	BE  *beStatus `json:"be,omitempty"`
}

func (r *runner) status() agentStatus {
	st := agentStatus{PID: os.Getpid()}
	if r.f != nil {
		s := r.f.statusOf()
		st.FE = &s
	}
	if r.b != nil {
		s := r.b.statusOf()
		st.BE = &s
	}
	return st
}

func (st agentStatus) write(w io.Writer) {
	if st.FE != nil {
		st.FE.write(w, st.PID)
	}
	if st.BE != nil {
		st.BE.write(w, st.PID)
	}
}

// command runs the FE's admin commands.
func (f *fe) command(cmd string, args []string, text io.Writer) (any, error) {
	addr := func() (netip.Addr, error) {
		a, err := netip.ParseAddr(args[0])
		if err != nil {
			return a, fmt.Errorf("%s: %q is not an address", cmd, args[0])
		}
		return a, nil
	}
	switch cmd {
	case "backends":
		bs := f.sched.Statuses()
		tw := tabwriter.NewWriter(text, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "backend\tstate\tweight\tactive\tlive\thandoffs\tfailures\tlast probe\t")
		for _, b := range bs {
			state := "AVAILABLE"
			if !b.Available {
				state = "NOTAVAILABLE"
			}
			if b.Draining {
				state += ",DRAINING"
			}
			if b.Registered {
				state += ",REGISTERED"
			}
			probe := "-"
			if !b.LastProbe.IsZero() {
				probe = b.LastProbe.Format(time.RFC3339)
				if b.LastError != "" {
					probe += " (" + b.LastError + ")"
				}
			}
			fmt.Fprintf(tw, "%s:%d\t%s\t%d\t%d\t%d\t%d\t%d\t%s\t\n", b.Addr, b.Port, state, b.Weight, b.Active, b.Live,
				b.Handoffs, b.Failures, probe)
		}
		tw.Flush()
		return bs, nil
	case "conns":
		rows := f.connRows()
		tw := tabwriter.NewWriter(text, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "client\tbe\tstate\tage\thandoff\t")
		for _, c := range rows {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", c.Client, c.BE, c.State, c.Age, c.Handoff)
		}
		tw.Flush()
		return rows, nil
	case "dtcinterval":
		d, err := config.ParseDuration(args[0])
		if err != nil {
			return nil, fmt.Errorf("dtcinterval %q: want seconds or a duration such as 500ms (0 turns detection off)", args[0])
		}
		f.dtc.Store(int64(d))
		f.log.Info("detection interval changed", "op", "admin", "dtcinterval", d)
		fmt.Fprintf(text, "dtcinterval %v\n", d)
		return map[string]string{"dtcinterval": d.String()}, nil
	case "drain", "enable":
		a, err := addr()
		if err != nil {
			return nil, err
		}
		if err := f.sched.SetDraining(a, cmd == "drain"); err != nil {
			return nil, fmt.Errorf("%s: %w", cmd, err)
		}
		f.kickCluster()
		f.log.Info("BE "+cmd+"ed by the operator", "op", "admin", "be", a.String())
		fmt.Fprintf(text, "%s %s\n", cmd, a)
		return map[string]string{cmd: a.String()}, nil
	case "weight":
		a, err := addr()
		if err != nil {
			return nil, err
		}
		w, err := strconv.Atoi(args[1])
		if err != nil {
			return nil, fmt.Errorf("weight %q: not a whole number", args[1])
		}
		if err := f.sched.SetWeight(a, w); err != nil {
			return nil, fmt.Errorf("weight: %w", err)
		}
		f.kickCluster()
		f.log.Info("BE weight changed by the operator", "op", "admin", "be", a.String(), "weight", w)
		fmt.Fprintf(text, "weight %s %d\n", a, w)
		return map[string]any{"backend": a.String(), "weight": w}, nil
	}
	return nil, errUsage
}

// beConnRow is one line of `tcphactl conns` on a BE: a connection handed
// to it that its relay serves (the seed's ESTABLISHED on a BE).
type beConnRow struct {
	Client   string `json:"client"`
	State    string `json:"state"`
	Age      string `json:"age"`
	Requests int    `json:"requests"`
}

func (b *be) conns(text io.Writer) []beConnRow {
	now := time.Now()
	rows := []beConnRow{}
	for _, c := range b.relay.Conns() {
		state := c.State.String()
		switch {
		case c.State != conntab.Established:
		case c.Busy:
			state += " busy"
		default:
			state += " idle"
		}
		rows = append(rows, beConnRow{Client: c.Client.String(), State: state,
			Age: now.Sub(c.Since).Truncate(time.Second).String(), Requests: c.Requests})
	}
	tw := tabwriter.NewWriter(text, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "client\tstate\tage\trequests\t")
	for _, c := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t\n", c.Client, c.State, c.Age, c.Requests)
	}
	tw.Flush()
	return rows
}

// connRow is one line of `tcphactl conns`.
type connRow struct {
	Client  string `json:"client"`
	BE      string `json:"be"`
	State   string `json:"state"`
	Age     string `json:"age"`
	Handoff string `json:"handoff"`
}

func (f *fe) connRows() []connRow {
	now := time.Now()
	var out []connRow
	for _, c := range f.table.Snapshot() {
		be := "-"
		if c.BE.IsValid() {
			be = c.BE.String()
		}
		out = append(out, connRow{Client: c.Client.String(), BE: be, State: c.State.String(),
			Age: now.Sub(c.Started).Truncate(time.Second).String(), Handoff: c.Latency.String()})
	}
	return out
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
	next, err := config.Load(r.cfg.File)
	if err != nil {
		r.log.Error("reload refused: the running config stays", "op", "reload", "err", err)
		return fmt.Errorf("reload refused, the running config stays: %w", err)
	}
	var fixed []string
	if (next.FE == nil) != (r.f == nil) || (next.BE == nil) != (r.b == nil) {
		fixed = append(fixed, "the roles ([fe], [be] sections)")
	}
	r.lg.SetLevel(next.Global.LogLevel)
	for _, k := range []string{"LogFile", "Admin", "Secret", "Metrics", "Pprof"} {
		if !reflect.DeepEqual(reflect.ValueOf(r.cfg.Global).FieldByName(k).Interface(),
			reflect.ValueOf(next.Global).FieldByName(k).Interface()) {
			fixed = append(fixed, "[global] "+strings.ToLower(k))
		}
	}
	if r.f != nil && next.FE != nil {
		fixed = append(fixed, r.f.reload(next.FE)...)
	}
	if r.b != nil && next.BE != nil {
		fixed = append(fixed, r.b.reload(next.BE)...)
	}
	if len(fixed) > 0 {
		r.log.Warn("reloaded; these changes take effect with an upgrade (tcpha-agent -upgrade, or SIGUSR2)",
			"op", "reload", "keys", strings.Join(fixed, ", "))
	} else {
		r.log.Info("reloaded", "op", "reload", "file", r.cfg.File)
	}
	return nil
}

// fixedKeys names the fields of a and b, two values of the same struct
// type, that differ and are not in reloadable.
func fixedKeys(section string, a, b any, reloadable ...string) []string {
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	var out []string
	for i := range va.NumField() {
		name := va.Type().Field(i).Name
		if slices.Contains(reloadable, name) {
			continue
		}
		if !reflect.DeepEqual(va.Field(i).Interface(), vb.Field(i).Interface()) {
			out = append(out, "["+section+"] "+strings.ToLower(name))
		}
	}
	return out
}

// monotonicUsec is CLOCK_MONOTONIC in microseconds, as systemd's RELOADING
// notification wants it.
func monotonicUsec() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano() / 1000
}
