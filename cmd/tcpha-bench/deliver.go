package main

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"tcpha/internal/bench"
	cluster "tcpha/internal/nscluster"
)

// The deliver workload (issue 15): (a), 1 MB one-request connections, (c)
// and (d) through tcpha with be1's agent in `[be] deliver = relay`, then
// `socket`, measuring be1's agent CPU beside the usual figures
// (docs/performance.md). It runs last in the default run (about 75 s more,
// 25 s with -smoke) and puts be1 and the FE's phttp back as the run
// started them.

// beDeliver, when set, is the [be] deliver the BEs' configs get at their
// agent's next start (the cluster's Edit: withDeliver).
var beDeliver atomic.Value // string

var deliverLine = regexp.MustCompile(`(?m)^deliver = .*\n`)

// withDeliver is a BE's config with [be] deliver = mode ("" : as given).
func withDeliver(conf, mode string) string {
	if mode == "" {
		return conf
	}
	return deliverLine.ReplaceAllString(conf, "") + "deliver = " + mode + "\n"
}

// deliverCost runs the deliver workload, and puts the FE's phttp and
// be1's deliver back.
func (b *bencher) deliverCost() (err error) {
	fe := frontEnd{bench.TCPHA, "http://" + cluster.VIP, func() int { return b.c.AgentPID("fe") }, "fe"}
	if err := b.use(fe); err != nil {
		return err
	}
	// A delivered connection's later requests are nginx's: socket needs
	// phttp = single, and relay gets it too so that only the BE differs.
	if err := b.setPHTTP("single"); err != nil {
		return err
	}
	defer func() {
		phttp := "multi"
		if b.deliverFE != "" {
			phttp = "single" // -deliver socket
		}
		mode := "relay"
		if b.p.deliver == "socket" {
			mode = "socket"
		}
		if rerr := b.setBEDeliver(mode); err == nil {
			err = rerr
		}
		beDeliver.Store("")
		if rerr := b.setPHTTP(phttp); err == nil {
			err = rerr
		}
	}()
	for _, mode := range []string{"relay", "socket"} {
		if err := b.setBEDeliver(mode); err != nil {
			return err
		}
		name := bench.TCPHARelay
		if mode == "socket" {
			name = bench.TCPHASocket
		}
		for _, w := range bench.DeliverWorkloads {
			r, err := b.deliverLoad(fe, w.ID, mode)
			if err != nil {
				return fmt.Errorf("deliver = %s: %w", mode, err)
			}
			r.FrontEnd = name
			b.run.Results = append(b.run.Results, r)
			fmt.Printf("   (deliver) %-12s %-4s %9.0f req/s  BE agent CPU/req %-9v machine CPU/req %-9v delivered %d relayed %d errors %d\n", name, w.ID, r.RPS,
				r.BECPUPerRequest(), r.MachineCPUPerRequest(), r.Delivered, r.Relayed, r.Errors)
		}
		if st, err := b.c.Admin("be1", "status"); err == nil && mode == "socket" {
			for l := range strings.Lines(st) {
				if strings.Contains(l, "deliver=socket") {
					fmt.Printf("   (deliver) be1: %s", strings.TrimSpace(l)+"\n")
				}
			}
		}
	}
	return nil
}

// deliverLoad runs one of the deliver workloads through fe, be1 in
// deliver mode, sampling be1's agent around it; with -profile, (a) takes
// CPU profiles of the FE and be1 agents (deliver-MODE-a).
func (b *bencher) deliverLoad(fe frontEnd, w, mode string) (bench.Result, error) {
	// A failed preparation pauses deliveries for 1 s (be/deliver.go): one
	// at the end of the last load must not relay this one's first
	// connections, (c)'s eight all.
	if mode == "socket" {
		time.Sleep(1100 * time.Millisecond)
	}
	pid := b.c.AgentPID("be1")
	before, err := bench.ProcessCPU(pid)
	if err != nil {
		return bench.Result{}, fmt.Errorf("be1's agent CPU: %w", err)
	}
	d0, r0 := b.deliveries()
	var r bench.Result
	secs := b.p.wrkSecs
	if b.p.smoke {
		secs = 1 // the restarts take most of the workload's time
	}
	switch w {
	case "a":
		var prof func() error
		if b.p.profileDir != "" {
			prof = b.startProfiles("deliver-" + mode + "-a")
		}
		r, err = b.load(fe, w, []string{"wrk", "-t2", "-c32", "-d", strconv.Itoa(secs) + "s", "--latency",
			"-H", "Connection: close", fe.base + "/1k.bin"}, prof)
	case bench.DeliverLarge:
		r, err = b.load(fe, w, []string{"wrk", "-t2", "-c32", "-d", strconv.Itoa(max(1, secs/2)) + "s", "--latency",
			"-H", "Connection: close", fe.base + "/1m.bin"}, nil)
	case "c":
		r, err = b.load(fe, w, []string{"wrk", "-t2", "-c8", "-d", strconv.Itoa(secs) + "s", "--latency", fe.base + "/1m.bin"}, nil)
	case "d":
		r, err = b.download(fe, w)
	default:
		return r, fmt.Errorf("no deliver workload %q", w)
	}
	if err != nil {
		return r, err
	}
	if b.c.AgentPID("be1") != pid {
		return r, fmt.Errorf("be1's agent restarted during (%s)", w)
	}
	after, err := bench.ProcessCPU(pid)
	if err != nil {
		return r, fmt.Errorf("be1's agent CPU: %w", err)
	}
	r.BECPU = after - before
	d1, r1 := b.deliveries()
	r.Delivered, r.Relayed = d1-d0, r1-r0
	return r, nil
}

var deliveredRe, relayedRe = regexp.MustCompile(`\bdelivered=(\d+)`), regexp.MustCompile(`\brelayed=(\d+)`)

// deliveries reads be1's delivered and relayed counts (HTTP connections),
// 0 without deliver = socket.
func (b *bencher) deliveries() (delivered, relayed int64) {
	st, _ := b.c.Admin("be1", "status")
	get := func(re *regexp.Regexp) int64 {
		m := re.FindStringSubmatch(st)
		if m == nil {
			return 0
		}
		n, _ := strconv.ParseInt(m[1], 10, 64)
		return n
	}
	return get(deliveredRe), get(relayedRe)
}

// setBEDeliver restarts be1's agent with [be] deliver = mode, and waits
// until the FE hands it connections again.
func (b *bencher) setBEDeliver(mode string) error {
	beDeliver.Store(mode)
	fmt.Printf("== restarting be1's agent with deliver = %s\n", mode)
	if err := b.c.StopAgent("be1", syscall.SIGTERM); err != nil {
		// Killed after 10 s (a connection the idle workload left, within
		// [be] drain): the new agent takes over its table all the same.
		b.run.Notes = append(b.run.Notes, "deliver workload: stopping be1's agent: "+err.Error())
	}
	if err := b.c.StartAgent("be1"); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		out, err := b.c.Output(ctx, "client", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}", "http://"+cluster.VIP+"/1k.bin")
		cancel()
		st, _ := b.c.Admin("be1", "status")
		if err == nil && out == "200 be1" && strings.Contains(st, "deliver=socket") == (mode == "socket") {
			time.Sleep(time.Second) // the FE's view of be1 settles
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("be1 with deliver = %s: not served through the VIP in 30 s: %q %v", mode, out, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
