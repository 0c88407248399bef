package backends

import (
	"testing"
	"time"
)

func TestRates(t *testing.T) {
	r := &Rates{Window: 2 * time.Second}
	t0 := time.Date(2026, 12, 3, 10, 0, 0, 0, time.UTC)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	row := func(a string) RateRow {
		t.Helper()
		for _, x := range r.Rows() {
			if x.Addr == a {
				return x
			}
		}
		t.Fatalf("%s not listed", a)
		return RateRow{}
	}
	r.Add(at(0), map[string]Counts{"a": {}, "b": {Conns: 5}})
	if got := row("a"); got.Rate != (PerSecond{}) || got.Peak != (PerSecond{}) {
		t.Errorf("one sample: %+v", got)
	}
	// 10 connections, 40 requests, 1000 and 8000 bytes a second.
	for s := 1; s <= 4; s++ {
		r.Add(at(s), map[string]Counts{"a": {Conns: int64(10 * s), Requests: int64(40 * s), BytesIn: int64(1000 * s), BytesOut: int64(8000 * s)}, "b": {Conns: 5}})
	}
	want := PerSecond{Conns: 10, Requests: 40, BytesIn: 1000, BytesOut: 8000}
	if got := row("a"); got.Rate != want || got.Peak != want || got.Total.Requests != 160 {
		t.Errorf("steady: %+v", got)
	}
	// A burst over the 2 s window: 100 connections in one second.
	r.Add(at(5), map[string]Counts{"a": {Conns: 140, Requests: 200, BytesIn: 5000, BytesOut: 40000}, "b": {Conns: 5}})
	if got := row("a"); got.Rate.Conns != 55 || got.Peak.Conns != 55 {
		t.Errorf("burst: %+v", got)
	}
	// Quiet: the rate falls to 0, the peak stays.
	r.Add(at(6), map[string]Counts{"a": {Conns: 140, Requests: 200, BytesIn: 5000, BytesOut: 40000}, "b": {Conns: 5}})
	r.Add(at(7), map[string]Counts{"a": {Conns: 140, Requests: 200, BytesIn: 5000, BytesOut: 40000}, "b": {Conns: 5}})
	if got := row("a"); got.Rate != (PerSecond{}) || got.Peak.Conns != 55 || got.Peak.BytesOut != 8000 {
		t.Errorf("quiet: %+v", got)
	}
	if got := row("b"); got.Rate != (PerSecond{}) || got.Total.Conns != 5 {
		t.Errorf("idle b: %+v", got)
	}
	r.ClearPeaks()
	if got := row("a"); got.Peak != (PerSecond{}) {
		t.Errorf("peaks after clear: %+v", got)
	}
	// Counters cleared: no negative rate, history starts over.
	r.Add(at(8), map[string]Counts{"a": {Conns: 3}})
	if got := row("a"); got.Rate != (PerSecond{}) || got.Total.Conns != 3 {
		t.Errorf("after a reset: %+v", got)
	}
	r.Add(at(9), map[string]Counts{"a": {Conns: 5}})
	if got := row("a"); got.Rate.Conns != 2 {
		t.Errorf("after a reset, a second later: %+v", got)
	}
	// b left out: forgotten.
	if len(r.Rows()) != 1 {
		t.Errorf("rows %+v", r.Rows())
	}
}
