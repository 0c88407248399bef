package bench

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// Front ends, in the order they are shown.
const (
	TCPHA   = "tcpha"
	HAProxy = "haproxy"
	Nginx   = "nginx"
	Direct  = "direct"
	// TCPHASingle and TCPHAForward are tcpha with phttp = single and
	// forward, measured in (f), (g) and (h) only; TCPHA runs the
	// default, multi.
	TCPHASingle  = "tcpha single"
	TCPHAForward = "tcpha forward"
	// TCPHABE is tcpha with [fe] accept = be (issue 14), on every
	// workload; TCPHABEAny the same in (a) with rules that let either BE
	// serve everything, so that every connection lands on its BE.
	TCPHABE    = "tcpha be"
	TCPHABEAny = "tcpha be any"
	// The HTTPS workloads' proxies (issue 16). HAProxySNI is HAProxy in
	// `mode tcp` routing on req.ssl_sni and NginxPreread nginx's stream
	// module with ssl_preread: both pass TLS through to the BEs' nginx
	// and carry every byte. HAProxyTLS terminates TLS (`mode http`) and
	// reuses plain connections to the BEs' port 80.
	HAProxySNI   = "haproxy-sni"
	HAProxyTLS   = "haproxy-tls"
	NginxPreread = "nginx-preread"
)

// HTTPSFrontEnds lists the HTTPS workloads' front ends in report order.
var HTTPSFrontEnds = []string{TCPHA, HAProxySNI, HAProxyTLS, NginxPreread, Direct}

// FrontEnds lists them in report order.
var FrontEnds = []string{TCPHA, TCPHASingle, TCPHAForward, TCPHABE, TCPHABEAny, HAProxy, Nginx, Direct}

// variants are front ends measured in some workloads only.
var variants = []string{TCPHASingle, TCPHAForward, TCPHABEAny}

// Workload describes one workload of the run.
type Workload struct {
	ID, Title string
}

// Workloads, in report order. The letters are the issue's.
var Workloads = []Workload{
	{"a", "(a) 1 KB, one request per connection (wrk, `Connection: close`)"},
	{"b", "(b) 1 KB, keep-alive (wrk)"},
	{"c", "(c) 1 MB, keep-alive (wrk)"},
	{"d", "(d) one 200 MB download (curl)"},
	{"e", "(e) sequential one-request connections, time to first byte (curl)"},
	{"f", "(f) keep-alive connections alternating BEs: 1 KB from be1, 1 KB and 100 KB images from be2 (wrk); switch = a request for the other BE's content on a held connection (curl, time to first byte)"},
	{"g", "(g) keep-alive connections loading pages: 1 KB from be1, then eight images from be2 (six of 1 KB, two of 100 KB) (wrk)"},
	{"h", "(h) keep-alive connections loading media: 1 KB from be1, then four 1 MB images from be2 (wrk)"},
}

// SizesKB are workload (i)'s response sizes (issue 14): one request per
// connection, from 1 KB to 1 MB.
var SizesKB = []int{1, 4, 16, 64, 256, 1024}

// sizes are the SizesKB (i) measured: all of them in a full run, a few in
// a smoke run (tcpha-bench -smoke), which keeps the suite in its budget.
func (r *Run) sizes() []int {
	var out []int
	for _, kb := range SizesKB {
		for _, fe := range SizeFrontEnds {
			if _, ok := r.Get(fe, SizeWorkload(kb)); ok {
				out = append(out, kb)
				break
			}
		}
	}
	return out
}

// largestSize names the largest size (i) measured.
func (r *Run) largestSize() string {
	s := r.sizes()
	if len(s) == 0 {
		return sizeName(SizesKB[len(SizesKB)-1])
	}
	return sizeName(s[len(s)-1])
}

// SizeWorkload is the result's workload name of (i) at kb KB.
func SizeWorkload(kb int) string { return fmt.Sprintf("i-%dk", kb) }

// SizeFrontEnds are the front ends (i) compares.
var SizeFrontEnds = []string{TCPHA, TCPHABE, HAProxy}

// Crossover is (i)'s answer for front end fe: the smallest response size
// from which fe's FE CPU per request stays below HAProxy's at every larger
// size measured; ok false when it never does, or a size lacks a figure.
func (r *Run) Crossover(fe string) (kb int, ok bool) {
	kb = -1
	sizes := r.sizes()
	for i := len(sizes) - 1; i >= 0; i-- {
		x, ok1 := r.Get(fe, SizeWorkload(sizes[i]))
		h, ok2 := r.Get(HAProxy, SizeWorkload(sizes[i]))
		if !ok1 || !ok2 {
			return 0, false
		}
		cx, ch := x.CPUPerRequest(), h.CPUPerRequest()
		if cx < 0 || ch <= 0 || cx >= ch {
			break
		}
		kb = sizes[i]
	}
	return kb, kb > 0
}

// HTTPSWorkloads are issue 16's, over TLS, in report order.
var HTTPSWorkloads = []Workload{
	{"j", "(j) HTTPS, 1 KB, one request per connection (wrk, `Connection: close`)"},
	{"k", "(k) HTTPS, 1 MB, keep-alive (wrk)"},
	{"l", "(l) HTTPS, one 200 MB download (curl)"},
}

// IsHTTPS tells whether w is one of HTTPSWorkloads.
func IsHTTPS(w string) bool {
	return slices.ContainsFunc(HTTPSWorkloads, func(x Workload) bool { return x.ID == w })
}

// Result is one front end's figures for one workload.
type Result struct {
	FrontEnd, Workload string
	Requests           int64
	Seconds            float64 // wall time of the load
	RPS                float64
	P50, P99           time.Duration // request latency (wrk, or curl's total time)
	TTFB50, TTFB99     time.Duration // (e): time to first byte
	FECPU              float64       // CPU seconds of the FE's process(es); NaN without one
	FEIn, FEOut        uint64        // bytes through the FE's NIC
	MachineCPU         float64       // busy CPU seconds of the whole machine
	RespBytes          float64       // response bytes the client read
	RSS                int64         // the FE process's resident memory after the load
	Errors             int64         // socket errors and non-2xx answers
	// HandoffP50/P99 are the FE agent's own handoff latencies during the
	// load (tcpha only), from its histogram.
	HandoffP50, HandoffP99 time.Duration
	// (f): of Switches requests for the other BE's content on a held
	// connection, how many that BE served.
	Switches, RightBE int
	// BECPU is the CPU seconds of be1's agent during the load, and
	// Delivered and Relayed, with deliver = socket, the connections it
	// gave nginx and those it relayed instead (the deliver table only:
	// deliver.go).
	BECPU              float64
	Delivered, Relayed int64
}

// CPUPerRequest is the FE's CPU time per request.
func (r Result) CPUPerRequest() time.Duration {
	if r.Requests == 0 || math.IsNaN(r.FECPU) {
		return -1
	}
	return time.Duration(r.FECPU / float64(r.Requests) * 1e9)
}

// MachineCPUPerGB is the machine's CPU seconds per GB of responses.
func (r Result) MachineCPUPerGB() float64 {
	if r.RespBytes == 0 {
		return math.NaN()
	}
	return r.MachineCPU / (r.RespBytes / 1e9)
}

// Idle is the memory of the agents holding many idle handed-off
// connections.
type Idle struct {
	Conns             int
	FEBefore, FEAfter int64
	BEBefore, BEAfter int64
	Opened, Answered  int
	Took              time.Duration
}

// Run is one whole benchmark run.
type Run struct {
	Date    time.Time
	Smoke   bool
	Machine string // kernel, CPU, cores
	Tools   []string
	Params  string // durations and concurrency
	// HTTPSParams is the load of the HTTPS workloads; HTTPSNotes are
	// said next to their figures (how busy the machine was).
	HTTPSParams string
	HTTPSNotes  []string
	Results     []Result
	// Flat is tcpha's handoff rate per window across a long run of (a).
	Flat       []float64
	FlatWindow time.Duration
	Idle       Idle
	Notes      []string // anything that went wrong in the run
}

// Get returns the result of front end fe for workload w.
func (r *Run) Get(fe, w string) (Result, bool) {
	for _, x := range r.Results {
		if x.FrontEnd == fe && x.Workload == w {
			return x, true
		}
	}
	return Result{}, false
}

// Target is one of the targets as measured in this run.
type Target struct {
	What, Want, Got string
	Met             bool
	Known           bool // false: not measured in this run
}

// Targets evaluates the targets against the run.
func (r *Run) Targets() []Target {
	var out []Target
	ratio := func(what, want string, fe1, w1, fe2, w2 string, f func(Result) float64, ok func(float64) bool) {
		a, ok1 := r.Get(fe1, w1)
		b, ok2 := r.Get(fe2, w2)
		t := Target{What: what, Want: want}
		if ok1 && ok2 && f(b) > 0 && !math.IsNaN(f(a)) {
			v := f(a) / f(b)
			t.Got, t.Met, t.Known = fmt.Sprintf("%.2f×", v), ok(v), true
		}
		out = append(out, t)
	}
	cpu := func(x Result) float64 { return float64(x.CPUPerRequest()) }
	ratio("(a) handoffs per second vs HAProxy's requests per second", "≥ 1.0×", TCPHA, "a", HAProxy, "a",
		func(x Result) float64 { return x.RPS }, func(v float64) bool { return v >= 1 })
	ratio("(a) FE process CPU per handoff vs HAProxy's per request", "≤ 1.0×", TCPHA, "a", HAProxy, "a",
		cpu, func(v float64) bool { return v <= 1 })
	ratio("(a) accept = be, every connection on its BE: FE process CPU per connection vs HAProxy's per request", "≤ 0.25×",
		TCPHABEAny, "a", HAProxy, "a", cpu, func(v float64) bool { return v <= 0.25 })
	ratio("(a) accept = be, half the connections moving: FE process CPU per connection vs HAProxy's per request", "≤ 1.0×",
		TCPHABE, "a", HAProxy, "a", cpu, func(v float64) bool { return v <= 1 })
	ratio("(a) accept = be, every connection on its BE: requests/s vs HAProxy's", "≥ 1.0×", TCPHABEAny, "a", HAProxy, "a",
		func(x Result) float64 { return x.RPS }, func(v float64) bool { return v >= 1 })
	ratio("(a) accept = be, half the connections moving: requests/s vs accept = fe's", "≥ 2×", TCPHABE, "a", TCPHA, "a",
		func(x Result) float64 { return x.RPS }, func(v float64) bool { return v >= 2 })
	ti := Target{What: "(i) crossover size with accept = be: the smallest response from which the FE's CPU per one-request connection stays below HAProxy's per request", Want: "≤ 4 KB"}
	if _, measured := r.Get(TCPHABE, SizeWorkload(SizesKB[0])); measured {
		ti.Known = true
		if kb, ok := r.Crossover(TCPHABE); ok {
			ti.Got, ti.Met = sizeName(kb), kb <= 4
		} else {
			ti.Got = "none up to " + r.largestSize()
		}
	}
	out = append(out, ti)
	// Workload "sync": (a)'s load through tcpha alone ("sync-off") and with
	// [fe] syncpeer and a standby FE applying the stream ("sync-on").
	ratio("(a) FE process CPU per handoff with syncpeer vs without", "≤ 1.1×", TCPHA, "sync-on", TCPHA, "sync-off",
		cpu, func(v float64) bool { return v <= 1.1 })
	ratio("(c) FE process CPU per request vs HAProxy's", "≤ 0.01×", TCPHA, "c", HAProxy, "c",
		cpu, func(v float64) bool { return v <= 0.01 })
	ratio("(d) FE process CPU for the download vs HAProxy's", "≤ 0.01×", TCPHA, "d", HAProxy, "d",
		func(x Result) float64 { return x.FECPU }, func(v float64) bool { return v <= 0.01 })
	added := func(what, want string, limit time.Duration, f func(Result) time.Duration) {
		fe := TCPHA
		if strings.HasPrefix(what, "(e) accept = be") {
			fe = TCPHABEAny
		}
		t := Target{What: what, Want: want}
		a, ok1 := r.Get(fe, "e")
		d, ok2 := r.Get(Direct, "e")
		if ok1 && ok2 {
			v := f(a) - f(d)
			t.Got, t.Met, t.Known = us(v), v < limit, true
		}
		out = append(out, t)
	}
	added("(e) time to first byte added over direct, p50", "< 200 µs", 200*time.Microsecond, func(x Result) time.Duration { return x.TTFB50 })
	added("(e) time to first byte added over direct, p99", "< 1 ms", time.Millisecond, func(x Result) time.Duration { return x.TTFB99 })
	added("(e) accept = be, a connection that lands on its BE: time to first byte added over direct, p50", "< 200 µs", 200*time.Microsecond, func(x Result) time.Duration { return x.TTFB50 })
	t := Target{What: "(f) migration latency (phttp = multi, unloaded): the request that moves the connection to its first response byte, p50", Want: "< 1 ms"}
	if f, ok := r.Get(TCPHA, "f"); ok && f.TTFB50 > 0 {
		t.Got, t.Met, t.Known = us(f.TTFB50)+" (p99 "+us(f.TTFB99)+")", f.TTFB50 < time.Millisecond, true
	}
	out = append(out, t)
	t = Target{What: "(f) migration latency, directly BE to BE (unloaded), p50 and p99", Want: "< 500 µs, < 2 ms"}
	if f, ok := r.Get(TCPHA, "f"); ok && f.TTFB50 > 0 {
		t.Got, t.Met, t.Known = us(f.TTFB50)+" (p99 "+us(f.TTFB99)+")", f.TTFB50 < 500*time.Microsecond && f.TTFB99 < 2*time.Millisecond, true
	}
	out = append(out, t)
	t = Target{What: "handoff latency p99 under (a)'s load (FE histogram)", Want: "< 5 ms"}
	if a, ok := r.Get(TCPHA, "a"); ok && a.HandoffP99 > 0 {
		t.Got, t.Met, t.Known = us(a.HandoffP99), a.HandoffP99 < 5*time.Millisecond, true
	}
	out = append(out, t)
	t = Target{What: fmt.Sprintf("(a) rate flat across %v (last window vs first)", time.Duration(len(r.Flat))*r.FlatWindow), Want: "≥ 0.8×, no decay"}
	if len(r.Flat) >= 2 && r.Flat[0] > 0 {
		v := r.Flat[len(r.Flat)-1] / r.Flat[0]
		t.Got, t.Met, t.Known = fmt.Sprintf("%.2f× (windows %s)", v, floats(r.Flat)), v >= 0.8, true
	}
	out = append(out, t)
	t = Target{What: fmt.Sprintf("agent RSS with %d handed-off connections alive", r.Idle.Conns), Want: "reported"}
	if r.Idle.Answered > 0 {
		t.Got = fmt.Sprintf("FE %s, BE %s (%d of %d answered)", mib(r.Idle.FEAfter), mib(r.Idle.BEAfter), r.Idle.Answered, r.Idle.Conns)
		t.Met, t.Known = true, true
	}
	out = append(out, t)
	return out
}

// HTTPSTargets evaluates issue 16's targets against the run: each a ratio
// of tcpha's figure to HAProxy's TLS passthrough's.
func (r *Run) HTTPSTargets() []Target {
	var out []Target
	ratio := func(what, want, w string, f func(Result) float64, ok func(float64) bool) {
		a, ok1 := r.Get(TCPHA, w)
		b, ok2 := r.Get(HAProxySNI, w)
		t := Target{What: what, Want: want}
		if ok1 && ok2 && f(b) > 0 && !math.IsNaN(f(a)) {
			v := f(a) / f(b)
			// Three decimals: a ratio against 0.01 needs them.
			t.Got, t.Met, t.Known = fmt.Sprintf("%.3f×", v), ok(v), true
		}
		out = append(out, t)
	}
	rps := func(x Result) float64 { return x.RPS }
	ratio("(j) HTTPS handoffs per second vs HAProxy passthrough's connections per second", "≥ 1.0×", "j",
		rps, func(v float64) bool { return v >= 1 })
	ratio("(k) HTTPS 1 MB keep-alive requests per second vs HAProxy passthrough's", "≥ 2.0×", "k",
		rps, func(v float64) bool { return v >= 2 })
	ratio("(l) FE process CPU for the HTTPS download vs HAProxy passthrough's", "≤ 0.01×", "l",
		func(x Result) float64 { return x.FECPU }, func(v float64) bool { return v <= 0.01 })
	return out
}

// targetTable writes targets as a table, each marked met, not met or not
// measured.
func targetTable(b *strings.Builder, targets []Target) {
	b.WriteString("| target | want | this run | |\n|---|---|---|---|\n")
	for _, t := range targets {
		verdict, got := "not measured", t.Got
		switch {
		case t.Known && t.Met:
			verdict = "met"
		case t.Known:
			verdict = "**not met** (see [performance.md](performance.md))"
		}
		if got == "" {
			got = "—"
		}
		fmt.Fprintf(b, "| %s | %s | %s | %s |\n", t.What, t.Want, got, verdict)
	}
}

func floats(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("%.0f", x)
	}
	return strings.Join(s, " ")
}

func us(d time.Duration) string {
	switch {
	case d < 0:
		return "−" + us(-d)
	case d < time.Millisecond:
		return fmt.Sprintf("%d µs", d.Microseconds())
	case d < time.Second:
		return fmt.Sprintf("%.2f ms", float64(d)/1e6)
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func bytesPer(b uint64, n int64) string {
	if n <= 0 {
		return "—"
	}
	v := float64(b) / float64(n)
	switch {
	case v >= 1<<20:
		return fmt.Sprintf("%.1f MiB", v/(1<<20))
	case v >= 1<<10:
		return fmt.Sprintf("%.1f KiB", v/(1<<10))
	}
	return fmt.Sprintf("%.0f B", v)
}

// Markdown renders the run as docs/benchmarks.md.
func (r *Run) Markdown(chart string) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("# Benchmarks: tcpha beside HAProxy and nginx\n\n")
	w("Written by `make bench` (`cmd/tcpha-bench`) on %s; do not edit by hand.", r.Date.Format("2006-01-02 15:04 MST"))
	if r.Smoke {
		w(" **Smoke run**: a few seconds per workload, to prove the harness, not to measure.")
	}
	w("\n\nOne namespace cluster on one machine — a client, an FE and two BEs with nginx on a bridge — and four front ends measured in the same run, one workload after another:\n\n")
	w("- **tcpha**: the client connects to the VIP; the FE hands each connection to a BE, which answers directly.\n")
	w("- **haproxy**: HAProxy in `mode http` on the FE (same VIP, another port), `http-reuse always` to the same BEs' nginx.\n")
	w("- **nginx**: nginx on the FE as a proxy (`proxy_pass`, upstream `keepalive`).\n")
	w("- **direct**: the client straight to be1's nginx: the baseline.\n")
	w("- **tcpha be** is tcpha with `[fe] accept = be`: the FE's packet path places each new connection on a BE by hash, and that BE reads the request and serves it or moves the connection straight to the BE the rules name (the FE only switches the flow). With the bench's rules (`.jpg` on be2, the rest on be1) about half of the connections move. **tcpha be any**, in (a) and (e) only, makes the rules for `.bin` and the rest name both BEs, so that every connection lands on its BE.\n")
	w("- In (f), (g) and (h), whose keep-alive connections ask for both BEs' content, **tcpha** runs its default, `phttp = multi`: the BE holding a connection moves it straight to the BE of its next request, the FE switching the flow's forwarding. **tcpha forward** is `phttp = forward`: that BE fetches the other BE's content from its nginx and relays it. **tcpha single** is `phttp = single`: every request stays on the connection's first BE (the wrong one for the other's content).\n\n")
	w("Machine: %s. %s\n\n", r.Machine, strings.Join(r.Tools, "; "))
	w("Load: %s. Client, FE, BEs and every server share the machine's cores, so figures are ratios within this run, not capacities; they move 20–40 %% between runs (FACTS.md).\n\n", r.Params)
	if chart != "" {
		w("![requests per second relative to direct, and FE CPU per request](%s)\n\n", chart)
	}
	w("## Targets\n\n")
	targetTable(&b, r.Targets())
	w("\n## Figures per workload\n\nFE CPU is the user+system time of the FE's own process(es) (`/proc/PID/stat`): the tcpha agent, HAProxy, the nginx proxy's master and workers; softirq work lands on whichever process runs, so the machine's total busy CPU is shown too. NIC bytes are the FE's eth0 per request.\n\n")
	for _, wl := range Workloads {
		// The phttp variants are measured in (f), (g) and (h) only.
		fes := slices.DeleteFunc(slices.Clone(FrontEnds), func(fe string) bool {
			_, ok := r.Get(fe, wl.ID)
			return !ok && slices.Contains(variants, fe)
		})
		r.table(&b, wl, fes)
	}
	r.sizeTable(&b)
	r.deliverTable(&b)
	if len(r.Flat) > 0 {
		w("## (a) over time, tcpha\n\nHandoffs per second in %v windows of one long run: %s.\n\n", r.FlatWindow, floats(r.Flat))
	}
	if r.Idle.Conns > 0 {
		w("## Idle handed-off connections\n\n%d keep-alive connections opened through tcpha, each served one request and left open (%d answered, in %v). Agent RSS before → after: FE %s → %s, BE %s → %s.\n\n",
			r.Idle.Conns, r.Idle.Answered, r.Idle.Took.Round(time.Millisecond), mib(r.Idle.FEBefore), mib(r.Idle.FEAfter), mib(r.Idle.BEBefore), mib(r.Idle.BEAfter))
	}
	if off, ok1 := r.Get(TCPHA, "sync-off"); ok1 {
		if on, ok2 := r.Get(TCPHA, "sync-on"); ok2 {
			w("## Flow sync between two FEs\n\n(a)'s load through tcpha, one run without `[fe] syncpeer` and one with it, a standby FE applying the stream: %.0f vs %.0f handoffs/s, FE process CPU per handoff %s vs %s.\n\n",
				off.RPS, on.RPS, us(off.CPUPerRequest()), us(on.CPUPerRequest()))
		}
	}
	if len(r.Notes) > 0 {
		w("## Notes from this run\n\n")
		for _, n := range r.Notes {
			w("- %s\n", n)
		}
		w("\n")
	}
	if slices.ContainsFunc(r.Results, func(x Result) bool { return IsHTTPS(x.Workload) }) {
		b.WriteString(r.HTTPSMarkdown())
	}
	w("Where the time goes, what was changed and what was tried: [performance.md](performance.md).\n")
	return b.String()
}

// table writes workload wl's figures, one column per front end.
func (r *Run) table(b *strings.Builder, wl Workload, fes []string) {
	w := func(format string, a ...any) { fmt.Fprintf(b, format, a...) }
	w("### %s\n\n| | %s |\n|---|%s\n", wl.Title, strings.Join(fes, " | "), strings.Repeat("---|", len(fes)))
	row := func(name string, f func(Result) string) {
		cells := make([]string, len(fes))
		for i, fe := range fes {
			if x, ok := r.Get(fe, wl.ID); ok {
				cells[i] = f(x)
			} else {
				cells[i] = "—"
			}
		}
		w("| %s | %s |\n", name, strings.Join(cells, " | "))
	}
	direct, _ := r.Get(Direct, wl.ID)
	switch wl.ID {
	case "d", "l":
		row("seconds", func(x Result) string { return fmt.Sprintf("%.2f", x.Seconds) })
		row("MB/s", func(x Result) string { return fmt.Sprintf("%.0f", x.RespBytes/1e6/x.Seconds) })
	case "e":
		row("connections", func(x Result) string { return fmt.Sprint(x.Requests) })
		row("time to first byte p50", func(x Result) string { return us(x.TTFB50) })
		row("time to first byte p99", func(x Result) string { return us(x.TTFB99) })
		row("added over direct, p50", func(x Result) string { return us(x.TTFB50 - direct.TTFB50) })
		row("added over direct, p99", func(x Result) string { return us(x.TTFB99 - direct.TTFB99) })
	default:
		row("requests/s", func(x Result) string { return fmt.Sprintf("%.0f", x.RPS) })
		if direct.RPS > 0 {
			row("vs direct", func(x Result) string { return fmt.Sprintf("%.2f×", x.RPS/direct.RPS) })
		}
		row("latency p50", func(x Result) string { return us(x.P50) })
		row("latency p99", func(x Result) string { return us(x.P99) })
	}
	row("FE CPU per request", func(x Result) string {
		if d := x.CPUPerRequest(); d >= 0 {
			return us(d)
		}
		return "—"
	})
	row("FE NIC in / out per request", func(x Result) string {
		return bytesPer(x.FEIn, x.Requests) + " / " + bytesPer(x.FEOut, x.Requests)
	})
	row("machine CPU s per GB of responses", func(x Result) string {
		if v := x.MachineCPUPerGB(); !math.IsNaN(v) {
			return fmt.Sprintf("%.1f", v)
		}
		return "—"
	})
	row("FE RSS after", func(x Result) string {
		if x.RSS > 0 {
			return mib(x.RSS)
		}
		return "—"
	})
	row("errors", func(x Result) string { return fmt.Sprint(x.Errors) })
	if wl.ID == "f" {
		row("switch time to first byte p50 / p99", func(x Result) string {
			if x.TTFB99 == 0 {
				return "—"
			}
			return us(x.TTFB50) + " / " + us(x.TTFB99)
		})
		row("requests served by the right BE", func(x Result) string {
			if x.Requests == 0 {
				return "—"
			}
			return fmt.Sprintf("%d of %d", x.RightBE, x.Switches)
		})
	}
	if wl.ID == "a" {
		row("handoff latency p50 / p99 (FE)", func(x Result) string {
			if x.HandoffP99 == 0 {
				return "—"
			}
			return us(x.HandoffP50) + " / " + us(x.HandoffP99)
		})
	}
	w("\n")
}

// The marks around the HTTPS part of docs/benchmarks.md, which a run of the
// HTTPS workloads alone rewrites (Splice).
const (
	httpsBegin = "<!-- HTTPS: `make bench-https` rewrites from here to the end mark -->"
	httpsEnd   = "<!-- end of HTTPS -->"
)

// HTTPSMarkdown renders the HTTPS workloads (j), (k) and (l): their front
// ends, targets and figures, between the marks Splice looks for.
func (r *Run) HTTPSMarkdown() string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("%s\n## HTTPS (issue 16)\n\n", httpsBegin)
	w("Measured on %s", r.Date.Format("2006-01-02 15:04 MST"))
	if r.Smoke {
		w(" (**smoke run**: a few seconds per workload, to prove the harness, not to measure)")
	}
	w(", by `make bench` or alone by `make bench-https`. The BEs' nginx holds a certificate made by openssl at setup (RSA 2048) and serves TLS on 443; five ways in, one workload after another:\n\n")
	w("- **tcpha**: `[fe] tlsport = 443`; the FE reads the ClientHello, hands the connection off, and the BE relays the TLS bytes to its nginx; responses go to the client directly.\n")
	w("- **haproxy-sni**: HAProxy `mode tcp` on the FE routing on `req.ssl_sni` to the BEs' port 443: TLS passes through, every byte crosses the FE.\n")
	w("- **haproxy-tls**: HAProxy `mode http` terminating TLS with the certificate, `http-reuse always` to the BEs' plain port 80.\n")
	w("- **nginx-preread**: nginx's stream module on the FE, `ssl_preread` on `$ssl_preread_server_name`, passing TLS through to the BEs' port 443.\n")
	w("- **direct**: the client straight to be1's nginx over TLS: the baseline.\n\n")
	w("Machine: %s. %s\n\n", r.Machine, strings.Join(r.Tools, "; "))
	w("Load: %s. Client, FE, BEs and every server share the machine's cores, so figures are ratios within this run, not capacities; they move 20–40 %% between runs (FACTS.md).", r.HTTPSParams)
	for _, n := range r.HTTPSNotes {
		w(" **%s**", n)
	}
	w("\n\n### HTTPS targets\n\n")
	targetTable(&b, r.HTTPSTargets())
	w("\n")
	for _, wl := range HTTPSWorkloads {
		r.table(&b, wl, HTTPSFrontEnds)
	}
	w("%s\n\n", httpsEnd)
	return b.String()
}

// Splice puts the HTTPS part into doc, a benchmarks.md written before:
// in place of its HTTPS part, or, the first time, before its closing
// line, so that the HTTPS workloads can be measured alone without losing
// the other workloads' figures.
func Splice(doc, https string) string {
	if i := strings.Index(doc, httpsBegin); i >= 0 {
		if j := strings.Index(doc[i:], httpsEnd); j >= 0 {
			rest := strings.TrimLeft(doc[i+j+len(httpsEnd):], "\n")
			return doc[:i] + https + rest
		}
	}
	if i := strings.LastIndex(doc, "\nWhere the time goes"); i >= 0 {
		return doc[:i+1] + https + doc[i+1:]
	}
	if doc != "" && !strings.HasSuffix(doc, "\n\n") {
		doc = strings.TrimRight(doc, "\n") + "\n\n"
	}
	return doc + https
}

// sizeTable writes workload (i): per response size, each front end's
// requests per second and FE CPU per request, and the crossovers.
func (r *Run) sizeTable(b *strings.Builder) {
	if _, ok := r.Get(HAProxy, SizeWorkload(SizesKB[0])); !ok {
		return
	}
	w := func(format string, a ...any) { fmt.Fprintf(b, format, a...) }
	w("### (i) one request per connection over response sizes (wrk, `Connection: close`)\n\n")
	w("The crossover is the smallest size from which tcpha's FE process CPU per request stays below HAProxy's at every larger size. With accept = be about half the connections move (the bench's rules).\n\n")
	w("| response |")
	for _, fe := range SizeFrontEnds {
		w(" %s req/s | %s FE CPU/req |", fe, fe)
	}
	w(" machine CPU/req, tcpha be | machine CPU/req, haproxy |\n|---|%s\n", strings.Repeat("---|", 2*len(SizeFrontEnds)+2))
	for _, kb := range r.sizes() {
		w("| %s |", sizeName(kb))
		for _, fe := range SizeFrontEnds {
			if x, ok := r.Get(fe, SizeWorkload(kb)); ok {
				w(" %.0f | %s |", x.RPS, us(x.CPUPerRequest()))
			} else {
				w(" — | — |")
			}
		}
		for _, fe := range []string{TCPHABE, HAProxy} {
			if x, ok := r.Get(fe, SizeWorkload(kb)); ok && x.Requests > 0 {
				w(" %s |", us(time.Duration(x.MachineCPU/float64(x.Requests)*1e9)))
			} else {
				w(" — |")
			}
		}
		w("\n")
	}
	w("\nCrossover:")
	for _, fe := range []string{TCPHA, TCPHABE} {
		if kb, ok := r.Crossover(fe); ok {
			w(" %s from %s;", fe, sizeName(kb))
		} else {
			w(" %s none up to %s;", fe, r.largestSize())
		}
	}
	w("\n\n")
}

func sizeName(kb int) string {
	if kb >= 1024 {
		return fmt.Sprintf("%d MB", kb/1024)
	}
	return fmt.Sprintf("%d KB", kb)
}
