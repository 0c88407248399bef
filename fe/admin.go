package fe

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"text/tabwriter"
	"time"

	"tcpha/admin"
	"tcpha/config"
)

// Command carries out the FE's admin commands, writing the text answer
// to text and returning the JSON one.
func (f *FE) Command(cmd string, args []string, text io.Writer) (any, error) {
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
		fmt.Fprintln(tw, "backend\tstate\tweight\tactive\tlive\thandoffs\tfailures\tlast change\tdowntime\tlast probe\t")
		for _, b := range bs {
			state := "AVAILABLE"
			if !b.Available {
				state = "NOTAVAILABLE"
			}
			if b.Maint {
				state += ",MAINT"
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
			fmt.Fprintf(tw, "%s:%d\t%s\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t\n", b.Addr, b.Port, state, b.Weight, b.Active, b.Live,
				b.Handoffs, b.Failures, b.LastChange.Format(time.RFC3339), seconds(b.Downtime).Round(time.Second), probe)
		}
		tw.Flush()
		return bs, nil
	case "conns":
		flt, err := admin.ParseConnFilter(args)
		if err != nil {
			return nil, err
		}
		all := f.connRows()
		if f.place != nil {
			// accept = be: the kernel holds the pins; the table only the
			// moves under way.
			pinned, err := f.place.pinnedRows()
			if err != nil {
				return nil, fmt.Errorf("conns: %w", err)
			}
			// A moved flow's row and its pin are one connection: the
			// row, which has its age, stands for it.
			type flow struct {
				client string
				port   uint16
			}
			rows := map[flow]bool{}
			for _, r := range all {
				rows[flow{r.Client, r.ClientPort}] = true
			}
			for _, p := range pinned {
				if !rows[flow{p.Client, p.ClientPort}] {
					all = append(all, p)
				}
			}
		}
		rows := filterConns(all, flt)
		tw := tabwriter.NewWriter(text, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "client\tbe\tstate\tage\thandoff\t")
		for _, c := range rows {
			be := c.BE
			if be == "" {
				be = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t\n", netip.AddrPortFrom(netip.MustParseAddr(c.Client), c.ClientPort), be, c.State,
				seconds(c.Age), seconds(c.Handoff))
		}
		tw.Flush()
		return rows, nil
	case "dtcinterval":
		d, err := config.ParseDuration(args[0])
		if err != nil || d < 0 {
			return nil, fmt.Errorf("dtcinterval %q: want seconds or a duration such as 500ms, not negative (0 turns detection off)", args[0])
		}
		f.dtc.Store(int64(d))
		f.log.Info("detection interval changed", "op", "admin", "dtcinterval", d)
		fmt.Fprintf(text, "dtcinterval %v\n", d)
		return map[string]float64{"dtcinterval_seconds": d.Seconds()}, nil
	case "drain", "enable":
		a, err := addr()
		if err != nil {
			return nil, err
		}
		if err := f.sched.SetDraining(a, cmd == "drain"); err != nil {
			return nil, fmt.Errorf("%s: %w", cmd, err)
		}
		f.kickCluster()
		done := map[string]string{"drain": "drained", "enable": "enabled"}[cmd]
		f.log.Info("BE "+done+" by the operator", "op", "admin", "be", a.String())
		fmt.Fprintf(text, "%s %s\n", cmd, a)
		return map[string]any{"addr": a.String(), "draining": cmd == "drain"}, nil
	case "maint", "ready":
		a, err := addr()
		if err != nil {
			return nil, err
		}
		c, err := f.sched.SetMaint(a, cmd == "maint")
		if err != nil {
			return nil, fmt.Errorf("%s: %w", cmd, err)
		}
		f.kickCluster()
		f.log.Info("BE "+map[string]string{"maint": "put in maintenance", "ready": "out of maintenance"}[cmd]+" by the operator",
			"op", "admin", "be", a.String(), "available", c.Available)
		fmt.Fprintf(text, "%s %s\n", cmd, a)
		return map[string]any{"addr": a.String(), "maint": cmd == "maint", "available": c.Available}, nil
	case "kill":
		a, err := addr()
		if err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		reset, unknown, err := f.kill(ctx, a)
		if err != nil {
			return nil, err
		}
		f.log.Info("BE's connections reset by the operator", "op", "admin", "be", a.String(), "reset", reset, "not_reached", unknown)
		fmt.Fprintf(text, "kill %s: %d connections reset, %d not reached (their forwarding is gone)\n", a, reset, unknown)
		return map[string]any{"addr": a.String(), "reset": reset, "not_reached": unknown}, nil
	case "rules":
		rows := f.sched.Rules()
		writeRules(text, rows)
		return rows, nil
	case "rates":
		rows := f.rates.Rows()
		writeRates(text, rows)
		return rows, nil
	case "clear":
		f.sched.ClearCounters()
		f.rates.ClearPeaks()
		f.log.Info("counters cleared by the operator", "op", "admin")
		fmt.Fprintln(text, "counters cleared")
		return map[string]bool{"cleared": true}, nil
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
		return map[string]any{"addr": a.String(), "weight": w}, nil
	}
	return nil, admin.ErrUsage
}

// connRow is one line of `tcphactl conns`: the client's address and port
// apart, as everywhere in tcphactl's JSON; be is empty before a BE took
// the connection.
type connRow struct {
	Client     string  `json:"client"`
	ClientPort uint16  `json:"client_port"`
	BE         string  `json:"be"`
	State      string  `json:"state"`
	Age        float64 `json:"age_seconds"`
	Handoff    float64 `json:"handoff_seconds"`
}

func (f *FE) connRows() []connRow {
	now := time.Now()
	out := []connRow{}
	for _, c := range f.table.Snapshot() {
		be := ""
		if c.BE.IsValid() {
			be = c.BE.String()
		}
		out = append(out, connRow{Client: c.Client.Addr().String(), ClientPort: c.Client.Port(), BE: be,
			State: c.State.String(), Age: now.Sub(c.Started).Truncate(time.Second).Seconds(), Handoff: c.Latency.Seconds()})
	}
	return out
}

// seconds is a JSON duration as text shows it.
func seconds(s float64) time.Duration {
	return time.Duration(s * float64(time.Second)).Round(time.Microsecond)
}
