package backends

import (
	"slices"
	"sync"
	"time"
)

// Counts are one BE's cumulative counters at one moment: connections
// handed to it (the FE's count), and requests and bytes from and to
// clients (its relay's, over every FE).
type Counts struct {
	Conns    int64 `json:"connections"`
	Requests int64 `json:"requests"`
	BytesIn  int64 `json:"bytes_in"`
	BytesOut int64 `json:"bytes_out"`
}

func (c Counts) below(o Counts) bool {
	return c.Conns < o.Conns || c.Requests < o.Requests || c.BytesIn < o.BytesIn || c.BytesOut < o.BytesOut
}

// PerSecond is Counts as rates.
type PerSecond struct {
	Conns    float64 `json:"connections"`
	Requests float64 `json:"requests"`
	BytesIn  float64 `json:"bytes_in"`
	BytesOut float64 `json:"bytes_out"`
}

func (p PerSecond) max(o PerSecond) PerSecond {
	return PerSecond{max(p.Conns, o.Conns), max(p.Requests, o.Requests), max(p.BytesIn, o.BytesIn), max(p.BytesOut, o.BytesOut)}
}

// RateRow is one BE in `tcphactl rates`: its totals, its rates now (over
// the last Window) and the highest rates seen since the agent started or
// the counters were cleared.
type RateRow struct {
	Addr  string    `json:"addr"`
	Total Counts    `json:"total"`
	Rate  PerSecond `json:"rate"`
	Peak  PerSecond `json:"peak"`
}

// Rates turns counters sampled about every second into rates, as
// ipvsadm --rate does from its estimator. It is safe for concurrent use.
type Rates struct {
	// Window is the span a current rate is measured over; 0: 5 s.
	Window time.Duration

	mu   sync.Mutex
	bes  map[string]*rateState
	seen bool
}

type rateState struct {
	samples []rateSample // oldest first, spanning at most Window
	rate    PerSecond
	peak    PerSecond
}

type rateSample struct {
	t time.Time
	c Counts
}

// Add records every BE's counters at now. A BE left out is forgotten; a
// counter that went down (counters cleared, a BE's agent restarted)
// starts that BE's history over.
func (r *Rates) Add(now time.Time, counts map[string]Counts) {
	r.mu.Lock()
	defer r.mu.Unlock()
	w := r.Window
	if w <= 0 {
		w = 5 * time.Second
	}
	if r.bes == nil {
		r.bes = map[string]*rateState{}
	}
	for a := range r.bes {
		if _, ok := counts[a]; !ok {
			delete(r.bes, a)
		}
	}
	for a, c := range counts {
		st := r.bes[a]
		if st == nil {
			st = &rateState{}
			r.bes[a] = st
		}
		if n := len(st.samples); n > 0 && c.below(st.samples[n-1].c) {
			st.samples = st.samples[:0]
		}
		st.samples = append(st.samples, rateSample{now, c})
		// Keep the newest sample at least Window old as the base.
		i := 0
		for i+1 < len(st.samples) && now.Sub(st.samples[i+1].t) >= w {
			i++
		}
		st.samples = slices.Delete(st.samples, 0, i)
		st.rate = PerSecond{}
		if old := st.samples[0]; now.After(old.t) {
			dt := now.Sub(old.t).Seconds()
			st.rate = PerSecond{
				Conns:    float64(c.Conns-old.c.Conns) / dt,
				Requests: float64(c.Requests-old.c.Requests) / dt,
				BytesIn:  float64(c.BytesIn-old.c.BytesIn) / dt,
				BytesOut: float64(c.BytesOut-old.c.BytesOut) / dt,
			}
		}
		st.peak = st.peak.max(st.rate)
	}
}

// Rows returns every BE's totals, rates and peaks, by address as given.
func (r *Rates) Rows() []RateRow {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]RateRow, 0, len(r.bes))
	for a, st := range r.bes {
		row := RateRow{Addr: a, Rate: st.rate, Peak: st.peak}
		if n := len(st.samples); n > 0 {
			row.Total = st.samples[n-1].c
		}
		out = append(out, row)
	}
	slices.SortFunc(out, func(x, y RateRow) int {
		if x.Addr < y.Addr {
			return -1
		}
		if x.Addr > y.Addr {
			return 1
		}
		return 0
	})
	return out
}

// ClearPeaks zeroes the peaks (tcphactl clear counters).
func (r *Rates) ClearPeaks() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, st := range r.bes {
		st.peak = st.rate
	}
}
