// Package bench is the side-by-side benchmark behind `make bench`: one
// namespace cluster, four front ends (tcpha, HAProxy, nginx as a proxy, and
// the client straight to a BE's nginx), the same workloads through each,
// and the figures as ratios measured in the same run. This file and its
// neighbours hold the pure parts: reading tools' output, statistics, the
// report and the chart; cmd/tcpha-bench drives the cluster.
package bench

import (
	"bufio"
	"fmt"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Wrk is what one wrk run reports.
type Wrk struct {
	Requests     int64
	Duration     time.Duration
	BytesRead    float64
	RPS          float64
	P50, P99     time.Duration
	SocketErrors int64
	Non2xx       int64
}

var (
	reWrkTotal  = regexp.MustCompile(`(\d+) requests in ([0-9.]+)(us|ms|s|m), ([0-9.]+)([KMGT]?B) read`)
	reWrkRPS    = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	reWrkPct    = regexp.MustCompile(`^\s*(50|99)(?:\.000)?%\s+([0-9.]+)(us|ms|s|m)\s*$`)
	reWrkSock   = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	reWrkNon2xx = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
)

// ParseWrk reads the output of `wrk --latency`.
func ParseWrk(out string) (Wrk, error) {
	var w Wrk
	m := reWrkTotal.FindStringSubmatch(out)
	if m == nil {
		return w, fmt.Errorf("wrk output has no request total:\n%s", out)
	}
	w.Requests, _ = strconv.ParseInt(m[1], 10, 64)
	w.Duration = duration(m[2], m[3])
	w.BytesRead = size(m[4], m[5])
	if m := reWrkRPS.FindStringSubmatch(out); m != nil {
		w.RPS, _ = strconv.ParseFloat(m[1], 64)
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if m := reWrkPct.FindStringSubmatch(sc.Text()); m != nil {
			d := duration(m[2], m[3])
			if m[1] == "50" {
				w.P50 = d
			} else {
				w.P99 = d
			}
		}
	}
	if m := reWrkSock.FindStringSubmatch(out); m != nil {
		for _, s := range m[1:] {
			n, _ := strconv.ParseInt(s, 10, 64)
			w.SocketErrors += n
		}
	}
	if m := reWrkNon2xx.FindStringSubmatch(out); m != nil {
		w.Non2xx, _ = strconv.ParseInt(m[1], 10, 64)
	}
	return w, nil
}

func duration(v, unit string) time.Duration {
	f, _ := strconv.ParseFloat(v, 64)
	mult := map[string]float64{"us": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9}[unit]
	return time.Duration(f * mult)
}

func size(v, unit string) float64 {
	f, _ := strconv.ParseFloat(v, 64)
	return f * map[string]float64{"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}[unit]
}

// Quantile returns the q-quantile (0..1) of samples by nearest rank; 0 for
// no samples.
func Quantile(samples []time.Duration, q float64) time.Duration {
	if len(samples) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), samples...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[max(0, min(i, len(s)-1))]
}

// Histogram is a Prometheus histogram's cumulative buckets: upper bound →
// count, as scraped.
type Histogram map[float64]float64

// ParseHistogram reads the buckets of the named histogram from Prometheus
// text exposition.
func ParseHistogram(text, name string) Histogram {
	h := Histogram{}
	prefix := name + `_bucket{le="`
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		rest := line[len(prefix):]
		le, after, ok := strings.Cut(rest, `"}`)
		if !ok {
			continue
		}
		bound, err := strconv.ParseFloat(le, 64)
		if le == "+Inf" {
			bound, err = math.Inf(1), nil
		}
		count, err2 := strconv.ParseFloat(strings.TrimSpace(after), 64)
		if err == nil && err2 == nil {
			h[bound] = count
		}
	}
	return h
}

// Counter reads one sample of a counter (with its labels as written, e.g.
// `tcpha_handoffs_total{result="ok"}`) from Prometheus text; 0 if absent.
func Counter(text, series string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, series+" ") {
			v, _ := strconv.ParseFloat(strings.TrimSpace(line[len(series):]), 64)
			return v
		}
	}
	return 0
}

// Sub returns the buckets of h minus those of before: the observations
// between two scrapes.
func (h Histogram) Sub(before Histogram) Histogram {
	d := Histogram{}
	for b, n := range h {
		d[b] = n - before[b]
	}
	return d
}

// Quantile estimates the q-quantile by linear interpolation inside the
// bucket that holds it, as Prometheus's histogram_quantile does.
func (h Histogram) Quantile(q float64) time.Duration {
	bounds := make([]float64, 0, len(h))
	for b := range h {
		bounds = append(bounds, b)
	}
	sort.Float64s(bounds)
	if len(bounds) == 0 {
		return 0
	}
	total := h[bounds[len(bounds)-1]]
	if total <= 0 {
		return 0
	}
	rank := q * total
	prevBound, prevCount := 0.0, 0.0
	for _, b := range bounds {
		c := h[b]
		if c >= rank {
			if math.IsInf(b, 1) {
				return time.Duration(prevBound * 1e9)
			}
			frac := 0.0
			if c > prevCount {
				frac = (rank - prevCount) / (c - prevCount)
			}
			return time.Duration((prevBound + frac*(b-prevBound)) * 1e9)
		}
		prevBound, prevCount = b, c
	}
	return time.Duration(prevBound * 1e9)
}

// Count is the number of observations in h.
func (h Histogram) Count() float64 {
	var max float64
	for _, c := range h {
		max = math.Max(max, c)
	}
	return max
}
