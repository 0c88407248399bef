package bench

import (
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The deliver table puts relay and socket side by side with the BE
// agent's CPU per request and their ratio; direct has no BE agent.
func TestDeliverTable(t *testing.T) {
	r := &Run{Results: []Result{
		{FrontEnd: TCPHARelay, Workload: "a", Requests: 1000, RPS: 5000, BECPU: 0.1, MachineCPU: 0.5},
		{FrontEnd: TCPHASocket, Workload: "a", Requests: 1000, RPS: 6000, BECPU: 0.05, MachineCPU: 0.4, Delivered: 990, Relayed: 10},
		{FrontEnd: Direct, Workload: "a", Requests: 1000, RPS: 9000, MachineCPU: 0.2},
		{FrontEnd: TCPHARelay, Workload: "d", Requests: 1, Seconds: 1, RespBytes: 200e6, BECPU: 0.1, MachineCPU: 1},
		{FrontEnd: TCPHASocket, Workload: "d", Requests: 1, Seconds: 0.5, RespBytes: 200e6, BECPU: 0.0001, MachineCPU: 0.5},
	}}
	md := r.Markdown("")
	for _, want := range []string{
		"## `[be] deliver`: relay beside socket",
		"| workload | | tcpha relay | tcpha socket | socket / relay | direct |",
		"| (a) 1 KB, one request per connection | requests/s | 5000 | 6000 | 1.20× | 9000 |",
		"| (a) 1 KB, one request per connection | BE agent CPU per request | 100 µs | 50 µs | 0.50× | — |",
		"| (a) 1 KB, one request per connection | machine CPU per request | 500 µs | 400 µs | 0.80× | 200 µs |",
		"| (d) one 200 MB download | MB/s | 200 | 400 | 2.00× | — |",
		"| (a) 1 KB, one request per connection | delivered / relayed | — | 990 / 10 | | |",
		"| (d) one 200 MB download | BE agent CPU per request | 100.00 ms | 100 µs | 0.001× | — |",
		"| 1 MB, one request per connection | requests/s | — | — | — | — |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("no %q in:\n%s", want, md)
		}
	}
	got := map[string]Target{}
	for _, x := range r.DeliverTargets() {
		got[x.What[:3]] = x
	}
	for w, want := range map[string]Target{
		"(d)": {Got: "", Known: false}, // no direct (d) in this run
		"BE ": {Got: "", Known: false}, // no 1 MB row
		"(a)": {Got: "0.80×", Known: true},
		"(g)": {Got: "", Known: false},
	} {
		if x := got[w]; x.Got != want.Got || x.Met != want.Met || x.Known != want.Known {
			t.Errorf("deliver target %s: %+v, want %+v", w, x, want)
		}
	}
	if !strings.Contains(md, "### Deliver targets") || !strings.Contains(md, "| (a) machine CPU per short connection with deliver = socket vs deliver = relay | ≤ 0.6× | 0.80× | **not met**") {
		t.Errorf("no deliver targets in:\n%s", md)
	}
	if md := (&Run{}).Markdown(""); strings.Contains(md, "deliver`: relay beside socket") {
		t.Error("a run without the deliver workload has its table")
	}
}

// ProcessCPU keeps the time of threads that ended (a BE agent with
// deliver = socket ends a thread per surgery), which a sum over the live
// threads' schedstat (ProcCPU) loses.
func TestProcessCPUKeepsEndedThreads(t *testing.T) {
	pid := os.Getpid()
	before, err := ProcessCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	live0, _ := ProcCPU(pid)
	done := make(chan struct{})
	var spin func()
	spin = func() {
		// A goroutine that exits locked ends its thread, unless the
		// thread is the main one (the runtime keeps it): then another
		// goroutine spins while this one holds it.
		runtime.LockOSThread()
		if syscall.Gettid() == pid {
			go spin()
			<-done
			runtime.UnlockOSThread()
			return
		}
		for start := time.Now(); time.Since(start) < 100*time.Millisecond; {
		}
		close(done)
	}
	go spin()
	<-done
	time.Sleep(50 * time.Millisecond)
	after, err := ProcessCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	live1, _ := ProcCPU(pid)
	tasks, _ := os.ReadDir("/proc/self/task")
	t.Logf("100 ms spun on a thread that ended: ProcessCPU +%.3f s, ProcCPU +%.3f s (%d threads)", after-before, live1-live0, len(tasks))
	if after-before < 0.05 {
		t.Errorf("ProcessCPU grew %.3f s across 100 ms spun on a thread that ended", after-before)
	}
}

// The deliver targets of a run with every figure: the ratios and verdicts
// come from the table's results.
func TestDeliverTargets(t *testing.T) {
	r := &Run{Results: []Result{
		{FrontEnd: TCPHARelay, Workload: "a", Requests: 1000, RPS: 5000, BECPU: 0.2, MachineCPU: 1},
		{FrontEnd: TCPHASocket, Workload: "a", Requests: 1000, RPS: 6000, BECPU: 0.5, MachineCPU: 0.5},
		{FrontEnd: TCPHARelay, Workload: DeliverLarge, Requests: 100, BECPU: 0.1},
		{FrontEnd: TCPHASocket, Workload: DeliverLarge, Requests: 100, BECPU: 0.06},
		{FrontEnd: TCPHASocket, Workload: "c", Requests: 100, RPS: 950},
		{FrontEnd: Direct, Workload: "c", Requests: 100, RPS: 1000},
		{FrontEnd: TCPHASocket, Workload: "d", Requests: 1, Seconds: 1, RespBytes: 200e6},
		{FrontEnd: Direct, Workload: "d", Requests: 1, Seconds: 0.5, RespBytes: 200e6},
	}}
	got := map[string]Target{}
	for _, x := range r.DeliverTargets() {
		got[x.What[:3]] = x
	}
	for w, want := range map[string]Target{
		"(d)": {Got: "0.50×", Known: true},
		"(c)": {Got: "0.95×", Known: true, Met: true},
		"BE ": {Got: "1.20× (600 µs against 500 µs); relay 5.00×", Known: true, Met: true},
		"(a)": {Got: "0.50×", Known: true, Met: true},
		"(g)": {},
	} {
		if x := got[w]; x.Got != want.Got || x.Met != want.Met || x.Known != want.Known {
			t.Errorf("%s: %+v, want %+v", w, x, want)
		}
	}
}
