package bench

import (
	"bytes"
	"math"
	"os"
	"strings"
	"testing"
	"time"
)

const wrkOut = `Running 5s test @ http://10.77.0.100/1k.bin
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.04ms    1.17ms  21.71ms   80.48%
    Req/Sec     8.00k   638.96     9.05k    72.00%
  Latency Distribution
     50%    1.80ms
     75%    2.42ms
     90%    3.30ms
     99%  612.00us
  79602 requests in 5.00s, 102.25MB read
  Socket errors: connect 1, read 2, write 0, timeout 4
  Non-2xx or 3xx responses: 12
Requests/sec:  15918.07
Transfer/sec:     20.45MB
`

func TestParseWrk(t *testing.T) {
	w, err := ParseWrk(wrkOut)
	if err != nil {
		t.Fatal(err)
	}
	want := Wrk{Requests: 79602, Duration: 5 * time.Second, BytesRead: 102.25 * (1 << 20), RPS: 15918.07,
		P50: 1800 * time.Microsecond, P99: 612 * time.Microsecond, SocketErrors: 7, Non2xx: 12}
	if w != want {
		t.Errorf("got %+v\nwant %+v", w, want)
	}
	if _, err := ParseWrk("unable to connect to 10.77.0.100:80 Connection refused"); err == nil {
		t.Error("no error for a failed run")
	}
}

func TestQuantile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(101-i)*time.Millisecond)
	}
	if q := Quantile(s, 0.5); q != 50*time.Millisecond {
		t.Errorf("p50 %v", q)
	}
	if q := Quantile(s, 0.99); q != 99*time.Millisecond {
		t.Errorf("p99 %v", q)
	}
	if Quantile(nil, 0.5) != 0 {
		t.Error("empty")
	}
}

func TestHistogram(t *testing.T) {
	before := `tcpha_handoff_duration_seconds_bucket{le="0.001"} 10
tcpha_handoff_duration_seconds_bucket{le="0.002"} 10
tcpha_handoff_duration_seconds_bucket{le="+Inf"} 10
tcpha_handoffs_total{result="ok"} 10
`
	after := `# HELP x
tcpha_handoff_duration_seconds_bucket{le="0.001"} 60
tcpha_handoff_duration_seconds_bucket{le="0.002"} 110
tcpha_handoff_duration_seconds_bucket{le="+Inf"} 111
tcpha_handoffs_total{result="ok"} 111
`
	name := "tcpha_handoff_duration_seconds"
	d := ParseHistogram(after, name).Sub(ParseHistogram(before, name))
	if d.Count() != 101 {
		t.Errorf("count %v", d.Count())
	}
	// 50 of 101 below 1 ms, 50 in (1 ms, 2 ms]: the median is just past 1 ms.
	if q := d.Quantile(0.5); q < 1000*time.Microsecond || q > 1020*time.Microsecond {
		t.Errorf("p50 %v", q)
	}
	if q := d.Quantile(0.2); q != 404*time.Microsecond {
		t.Errorf("p20 %v", q)
	}
	if q := d.Quantile(1); q != 2*time.Millisecond {
		t.Errorf("p100 %v (the +Inf bucket reads as the last finite bound)", q)
	}
	if v := Counter(after, `tcpha_handoffs_total{result="ok"}`) - Counter(before, `tcpha_handoffs_total{result="ok"}`); v != 101 {
		t.Errorf("counter delta %v", v)
	}
}

func TestProcParsers(t *testing.T) {
	stat := "1234 (tcpha agent (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 0 0"
	if cpu, err := parseStatCPU(stat); err != nil || cpu != 3 {
		t.Errorf("stat cpu %v %v", cpu, err)
	}
	if ns, err := parseSchedstat("123456789 2000 30\n"); err != nil || ns != 123456789 {
		t.Errorf("schedstat %v %v", ns, err)
	}
	busy, err := parseMachineBusy("cpu  100 5 50 1000 20 3 7 2 40 0\ncpu0 1 2 3\n")
	if err != nil || math.Abs(busy-1.67) > 1e-9 {
		t.Errorf("machine busy %v %v", busy, err)
	}
	if _, err := parseMachineBusy("intr 1 2 3\n"); err == nil {
		t.Error("no error for a wrong line")
	}
}

func sampleRun() *Run {
	r := &Run{Date: time.Unix(0, 0).UTC(), Machine: "test", FlatWindow: 10 * time.Second, Flat: []float64{1000, 950, 900}}
	add := func(fe, w string, rps, cpu float64, n int64) {
		r.Results = append(r.Results, Result{FrontEnd: fe, Workload: w, RPS: rps, FECPU: cpu, Requests: n,
			RespBytes: 1e9, MachineCPU: 2, TTFB50: time.Millisecond, TTFB99: 2 * time.Millisecond})
	}
	add(TCPHA, "a", 12000, 0.5, 10000)
	add(HAProxy, "a", 10000, 0.6, 10000)
	add(Direct, "a", 20000, math.NaN(), 20000)
	add(TCPHA, "c", 1000, 0.001, 1000)
	add(HAProxy, "c", 900, 1.5, 1000)
	add(TCPHA, "f", 13000, 0.001, 10000)
	add(TCPHASingle, "f", 15000, 0.001, 10000)
	add(TCPHAForward, "f", 11000, 0.001, 10000)
	add(HAProxy, "f", 10000, 0.9, 10000)
	add(Direct, "f", 30000, math.NaN(), 10000)
	r.Results = append(r.Results, Result{FrontEnd: TCPHA, Workload: "e", TTFB50: 1100 * time.Microsecond, TTFB99: 3 * time.Millisecond},
		Result{FrontEnd: Direct, Workload: "e", TTFB50: 1000 * time.Microsecond, TTFB99: 1500 * time.Microsecond})
	return r
}

func TestTargets(t *testing.T) {
	targets := sampleRun().Targets()
	check := func(prefix string, met, known bool, value string) {
		t.Helper()
		var x Target
		for _, y := range targets {
			if strings.HasPrefix(y.What, prefix) {
				x = y
				break
			}
		}
		if x.Met != met || x.Known != known || !strings.HasPrefix(x.Got, value) {
			t.Errorf("%s: %+v, want met=%v known=%v %q", prefix, x, met, known, value)
		}
	}
	check("(a) handoffs per second", true, true, "1.20×")
	check("(a) FE process CPU", true, true, "0.83×")
	check("(c) FE process CPU", true, true, "0.00×")
	check("(d) FE process CPU", false, false, "")
	check("(e) time to first byte added over direct, p50", true, true, "100 µs")
	check("(e) time to first byte added over direct, p99", false, true, "1.50 ms")
	check("(a) rate flat across", true, true, "0.90×")
	check("(a) FE process CPU per handoff with syncpeer", false, false, "")
	r := sampleRun()
	off, _ := r.Get(TCPHA, "a")
	on := off
	off.Workload, on.Workload, on.FECPU = "sync-off", "sync-on", off.FECPU*1.05
	r.Results = append(r.Results, off, on)
	for _, x := range r.Targets() {
		if strings.HasPrefix(x.What, "(a) FE process CPU per handoff with syncpeer") && (!x.Met || x.Got != "1.05×") {
			t.Errorf("the sync cost target: %+v, want met at 1.05×", x)
		}
	}
}

func TestMarkdownAndChart(t *testing.T) {
	r := sampleRun()
	md := r.Markdown("benchmarks.png")
	for _, want := range []string{"| (a) handoffs per second vs HAProxy's requests per second | ≥ 1.0× | 1.20× | met |",
		"| requests/s | 12000 | — | 10000 | — | 20000 |", "**not met**", "![requests per second"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	png, err := r.Chart()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) || len(png) < 1000 {
		t.Errorf("chart is not a PNG (%d bytes)", len(png))
	}
	if out := os.Getenv("BENCH_CHART_OUT"); out != "" {
		os.WriteFile(out, png, 0o644) // to look at it
	}
}

func httpsRun() *Run {
	r := &Run{Date: time.Unix(0, 0).UTC(), Machine: "test", HTTPSParams: "short", HTTPSNotes: []string{"a busy machine"}}
	add := func(fe, w string, rps, cpu float64) {
		r.Results = append(r.Results, Result{FrontEnd: fe, Workload: w, RPS: rps, FECPU: cpu, Requests: 1000, RespBytes: 1e9, Seconds: 1})
	}
	add(TCPHA, "j", 900, 0.3)
	add(HAProxySNI, "j", 1000, 0.2)
	add(TCPHA, "k", 2100, 0.001)
	add(HAProxySNI, "k", 1000, 1.5)
	add(HAProxyTLS, "k", 800, 2)
	add(TCPHA, "l", 1, 0.001)
	add(HAProxySNI, "l", 1, 0.2)
	add(Direct, "l", 1, math.NaN())
	return r
}

func TestHTTPSTargets(t *testing.T) {
	got := map[string]Target{}
	for _, x := range httpsRun().HTTPSTargets() {
		got[x.What[:3]] = x
	}
	for w, want := range map[string]Target{
		"(j)": {Got: "0.900×", Known: true},
		"(k)": {Got: "2.100×", Known: true, Met: true},
		"(l)": {Got: "0.005×", Known: true, Met: true},
	} {
		if x := got[w]; x.Got != want.Got || x.Met != want.Met || x.Known != want.Known {
			t.Errorf("%s: %+v, want %+v", w, x, want)
		}
	}
	if ts := (&Run{}).HTTPSTargets(); len(ts) != 3 || ts[0].Known {
		t.Errorf("an empty run: %+v", ts)
	}
}

// The HTTPS part goes into a full run's report, and a run of the HTTPS
// workloads alone replaces it in the file, keeping the rest.
func TestHTTPSMarkdownSplice(t *testing.T) {
	r := httpsRun()
	part := r.HTTPSMarkdown()
	for _, want := range []string{"| | tcpha | haproxy-sni | haproxy-tls | nginx-preread | direct |",
		"| (k) HTTPS 1 MB keep-alive requests per second vs HAProxy passthrough's | ≥ 2.0× | 2.100× | met |",
		"| requests/s | 2100 | 1000 | 800 | — | — |", "**a busy machine**", "### (l)", "| seconds | 1.00 |"} {
		if !strings.Contains(part, want) {
			t.Errorf("HTTPS part lacks %q:\n%s", want, part)
		}
	}
	full := sampleRun()
	full.Results = append(full.Results, r.Results...)
	doc := full.Markdown("")
	if !strings.Contains(doc, part[:strings.Index(part, "\n")]) || !strings.HasSuffix(doc, "[performance.md](performance.md).\n") {
		t.Fatalf("a full run's report has no HTTPS part before its last line:\n%s", doc)
	}
	if md := sampleRun().Markdown(""); strings.Contains(md, httpsBegin) {
		t.Error("a run without HTTPS workloads has an HTTPS part")
	}

	r2 := httpsRun()
	r2.Results[0].RPS = 4321
	part2 := r2.HTTPSMarkdown()
	got := Splice(doc, part2)
	if !strings.Contains(got, "| requests/s | 4321 |") || strings.Count(got, httpsBegin) != 1 || strings.Count(got, httpsEnd) != 1 {
		t.Errorf("splice did not replace the HTTPS part:\n%s", got)
	}
	if before, _, _ := strings.Cut(got, httpsBegin); before != doc[:strings.Index(doc, httpsBegin)] {
		t.Error("splice changed what comes before the HTTPS part")
	}
	if !strings.HasSuffix(got, "[performance.md](performance.md).\n") {
		t.Error("splice lost what comes after the HTTPS part")
	}
	// A report from before the HTTPS workloads: inserted before its last line.
	old := sampleRun().Markdown("")
	got = Splice(old, part2)
	if !strings.HasPrefix(got, strings.TrimSuffix(old, "Where the time goes, what was changed and what was tried: [performance.md](performance.md).\n")) ||
		!strings.Contains(got, part2+"Where the time goes") {
		t.Errorf("splice into an older report:\n%s", got)
	}
	if got := Splice("", part2); got != part2 {
		t.Errorf("splice into nothing: %q", got)
	}
}

// (i)'s crossover is the smallest size from which tcpha stays below
// HAProxy at every larger size: a dip below it at a small size that does
// not last does not count.
func TestCrossover(t *testing.T) {
	r := &Run{}
	add := func(fe string, kb int, cpuUS float64) {
		r.Results = append(r.Results, Result{FrontEnd: fe, Workload: SizeWorkload(kb), Requests: 1000,
			FECPU: cpuUS * 1000 / 1e6, RPS: 1000, MachineCPU: 1})
	}
	for i, kb := range SizesKB {
		add(HAProxy, kb, 30+float64(i)*40)                 // 30, 70, 110, 150, 190, 230 µs
		add(TCPHA, kb, 140+float64(i)*10)                  // 140 … 190: below from 256 KB
		add(TCPHABE, kb, []float64{20, 90, 5, 5, 5, 5}[i]) // below at 1 KB, above at 4, below from 16
	}
	if kb, ok := r.Crossover(TCPHA); !ok || kb != 256 {
		t.Errorf("tcpha crossover %d %v, want 256 KB", kb, ok)
	}
	if kb, ok := r.Crossover(TCPHABE); !ok || kb != 16 {
		t.Errorf("tcpha be crossover %d %v, want 16 KB", kb, ok)
	}
	var got Target
	for _, x := range r.Targets() {
		if strings.HasPrefix(x.What, "(i) crossover") {
			got = x
		}
	}
	if !got.Known || got.Met || got.Got != "16 KB" {
		t.Errorf("target %+v, want 16 KB, not met", got)
	}
	md := r.Markdown("")
	if !strings.Contains(md, "| 1 MB | 1000 | 190 µs | 1000 | 5 µs | 1000 | 230 µs |") ||
		!strings.Contains(md, "Crossover: tcpha from 256 KB; tcpha be from 16 KB;") {
		t.Errorf("markdown:\n%s", md)
	}
	if _, err := r.Chart(); err != nil {
		t.Fatal(err)
	}
	r.Results = r.Results[:len(r.Results)-1] // tcpha be at 1 MB missing
	if _, ok := r.Crossover(TCPHABE); ok {
		t.Error("a crossover without every size")
	}
}

// A smoke run measures (i) at a few sizes only: the table shows those, and
// the crossover is judged over them, not failed for the sizes not run.
func TestCrossoverFewSizes(t *testing.T) {
	r := &Run{Smoke: true}
	for _, kb := range []int{1, 64} {
		for _, fe := range SizeFrontEnds {
			cpu := 100.0
			if fe == TCPHABE {
				cpu = 10
			}
			r.Results = append(r.Results, Result{FrontEnd: fe, Workload: SizeWorkload(kb), Requests: 1000,
				FECPU: cpu * 1000 / 1e6, RPS: 1000, MachineCPU: 1})
		}
	}
	if kb, ok := r.Crossover(TCPHABE); !ok || kb != 1 {
		t.Errorf("tcpha be crossover %d %v, want 1 KB", kb, ok)
	}
	md := r.Markdown("")
	if !strings.Contains(md, "| 1 KB | 1000 | 100 µs | 1000 | 10 µs | 1000 | 100 µs |") ||
		!strings.Contains(md, "| 64 KB | 1000 | 100 µs | 1000 | 10 µs | 1000 | 100 µs |") || strings.Contains(md, "| 4 KB |") ||
		!strings.Contains(md, "Crossover: tcpha none up to 64 KB; tcpha be from 1 KB;") {
		t.Errorf("markdown:\n%s", md)
	}
}
