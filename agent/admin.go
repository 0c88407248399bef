package agent

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"tcpha/admin"
	"tcpha/config"
	"tcpha/handoff/conntab"

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
			return nil, "", fmt.Errorf("%s: this host has no fe role", cmd)
		}
		var err error
		if v, err = r.f.command(cmd, args, &text); err != nil {
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
	return nil, admin.ErrUsage
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
