package fe

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"text/tabwriter"
	"time"

	"tcpha/admin"
	"tcpha/backends"
	"tcpha/handoff"
	"tcpha/handoff/conntab"
	"tcpha/handoff/wire"
)

// What an operator reaches for in an incident (issue 18): each BE's
// rates, maint and ready, kill, the rules' hits, clear counters.

// statsEvery is how often the FE samples the BEs' counters for rates.
const statsEvery = time.Second

// noStatsWait is how long the FE leaves a BE too old to report its
// relay's counters before it asks again (each question costs that BE a
// log line).
const noStatsWait = time.Minute

// relayCounters are the last relay counters each BE reported.
type relayCounters struct {
	mu     sync.Mutex
	last   map[netip.Addr]wire.RelayStats
	silent map[netip.Addr]time.Time // BEs too old to answer, until when
}

func (r *relayCounters) get(a netip.Addr) (wire.RelayStats, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	st, ok := r.last[a]
	return st, ok
}

// statsLoop samples every statsEvery each BE's counters (handoffs here,
// requests and bytes from its relay) into the rates.
func (f *FE) statsLoop(ctx context.Context) {
	t := time.NewTicker(statsEvery)
	defer t.Stop()
	for {
		// The first sample at once: the first second's traffic is a rate.
		f.sampleStats(ctx, time.Now())
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sampleStats asks each BE for its relay's counters and adds a sample of
// every BE to the rates.
func (f *FE) sampleStats(ctx context.Context, now time.Time) {
	rc := &f.relayStats
	var wg sync.WaitGroup
	for _, srv := range f.sched.Servers() {
		rc.mu.Lock()
		skip := now.Before(rc.silent[srv.Addr])
		rc.mu.Unlock()
		if skip {
			continue
		}
		wg.Go(func() {
			sctx, cancel := context.WithTimeout(ctx, statsEvery)
			st, err := f.client.Stats(sctx, srv.AddrPort())
			cancel()
			rc.mu.Lock()
			defer rc.mu.Unlock()
			switch {
			case err == nil:
				rc.last[srv.Addr] = st
			case errors.Is(err, handoff.ErrNoStats):
				rc.silent[srv.Addr] = now.Add(noStatsWait)
			}
		})
	}
	wg.Wait()
	counts := map[string]backends.Counts{}
	for _, b := range f.sched.Statuses() {
		st, _ := rc.get(b.Server.Addr)
		counts[b.Addr] = backends.Counts{Conns: b.Handoffs, Requests: int64(st.Requests),
			BytesIn: int64(st.BytesIn), BytesOut: int64(st.BytesOut)}
	}
	f.rates.Add(now, counts)
}

// writeRates writes `tcphactl rates`.
func writeRates(w io.Writer, rows []backends.RateRow) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "backend\tconns/s\tpeak\treqs/s\tpeak\tin B/s\tpeak\tout B/s\tpeak\tconns\treqs\tin B\tout B\t")
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%.1f\t%.1f\t%.1f\t%.1f\t%.0f\t%.0f\t%.0f\t%.0f\t%d\t%d\t%d\t%d\t\n", r.Addr,
			r.Rate.Conns, r.Peak.Conns, r.Rate.Requests, r.Peak.Requests, r.Rate.BytesIn, r.Peak.BytesIn,
			r.Rate.BytesOut, r.Peak.BytesOut, r.Total.Conns, r.Total.Requests, r.Total.BytesIn, r.Total.BytesOut)
	}
	tw.Flush()
}

// writeRules writes `tcphactl rules`.
func writeRules(w io.Writer, rows []backends.RuleStatus) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "line\ttargets\tscheduler\thost\tpattern\thits\t")
	for _, r := range rows {
		line := fmt.Sprint(r.Line)
		if r.Registered {
			line = "reg"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t\n", line, r.Targets, dash(r.Scheduler), dash(r.Host), dash(r.Pattern), r.Hits)
	}
	tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// killPlan is which of the rows `kill ADDR` ends: the connections handed
// off to be. Those still being handed off are left to their handoff (it
// fails or commits within the handoff timeout); TIME_WAIT rows are closed
// already.
func killPlan(rows []conntab.Conn, be netip.Addr) []conntab.Conn {
	var out []conntab.Conn
	for _, c := range rows {
		if c.BE == be && c.State == conntab.Handoffed {
			out = append(out, c)
		}
	}
	return out
}

// kill resets be's connections, as HAProxy's `shutdown sessions server`:
// the BE sends each client a RST and forgets it, and the FE drops its
// forwarding, so that neither the client nor the BE waits for the other.
// It returns how many were reset and how many the BE did not know or
// could not be asked about (their forwarding is dropped all the same).
func (f *FE) kill(ctx context.Context, be netip.Addr) (reset, unknown int, err error) {
	var port uint16
	for _, srv := range f.sched.Servers() {
		if srv.Addr == be {
			port = srv.Port
		}
	}
	if port == 0 {
		return 0, 0, fmt.Errorf("kill %v: %w", be, backends.ErrUnknownBE)
	}
	rows := killPlan(f.table.Snapshot(), be)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, c := range rows {
		wg.Go(func() {
			rerr := f.client.Reset(ctx, netip.AddrPortFrom(be, port), c.Client)
			// The forwarding goes whatever the BE said: a connection it
			// does not know is dead, and one it could not be asked about
			// can no longer reach it through this FE.
			still := func() bool { return f.table.Unchanged(c.Client, c.State, c.Since) }
			if ferr := f.flows.Remove(ctx, c.Client, still); ferr == nil {
				f.table.DropIf(c.Client, c.State, c.Since)
			} else {
				f.log.Debug("forwarding of a killed connection not removed", "op", "kill", "client", c.Client.String(), "err", ferr)
			}
			mu.Lock()
			defer mu.Unlock()
			if rerr != nil {
				unknown++
				f.log.Debug("reset not done", "op", "kill", "client", c.Client.String(), "be", be.String(), "err", rerr)
				return
			}
			reset++
		})
	}
	wg.Wait()
	return reset, unknown, nil
}

// filterConns keeps the rows the filter passes.
func filterConns(rows []connRow, flt admin.ConnFilter) []connRow {
	out := []connRow{}
	for _, c := range rows {
		be, _ := netip.ParseAddr(c.BE)
		client := netip.AddrPortFrom(netip.MustParseAddr(c.Client), c.ClientPort)
		if flt.Match(client, be, c.State) {
			out = append(out, c)
		}
	}
	return out
}
