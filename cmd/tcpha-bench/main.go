// Command tcpha-bench measures tcpha beside the proxies it replaces, on one
// namespace cluster in one run: tcpha, HAProxy (`mode http`, `http-reuse
// always`) and nginx (`proxy_pass`, upstream keepalive) on the FE, and the
// client straight to a BE's nginx; over HTTPS ((j), (k), (l)), tcpha,
// HAProxy passing TLS through on SNI and terminating it, nginx's
// ssl_preread, and direct. It writes docs/benchmarks.md and its chart
// (`make bench`).
//
//	tcpha-bench [-agent bin/tcpha-agent] [-smoke] [-out docs/benchmarks.md]
//	            [-chart docs/benchmarks.png] [-profile DIR] [-only LIST]
//	            [-fe LIST] [-seconds N] [-note TEXT]
//
// -smoke runs each workload for a second or two: it proves the harness (CI
// runs it), it does not measure. -profile saves CPU profiles of the FE and
// be1 agents taken during workloads (a) and (g), for each tcpha front end.
// With -only naming HTTPS workloads alone (`make bench-https`), the HTTPS
// part of the -out file is rewritten and the rest of it kept.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tcpha/internal/bench"
	cluster "tcpha/internal/nscluster"
)

type params struct {
	smoke      bool
	wrkSecs    int
	flatTotal  time.Duration
	flatWindow time.Duration
	bigMB      int
	ttfbN      int
	idleConns  int
	profileDir string
	tlsSecs    int             // per wrk workload over HTTPS
	sizesKB    []int           // (i)'s response sizes
	only, fes  map[string]bool // empty: all
	// deliver is the BEs' [be] deliver; socket also sets the FE's phttp
	// = single, which it needs (tcpha.conf(5)).
	deliver string
}

func set(list string) map[string]bool {
	m := map[string]bool{}
	for _, x := range strings.Split(list, ",") {
		if x = strings.TrimSpace(x); x != "" {
			m[x] = true
		}
	}
	return m
}

func (p params) runs(workload string) bool { return len(p.only) == 0 || p.only[workload] }

// httpsOnly tells whether only HTTPS workloads were asked for.
func (p params) httpsOnly() bool {
	for w := range p.only {
		if !bench.IsHTTPS(w) {
			return false
		}
	}
	return len(p.only) > 0
}

func main() {
	agent := flag.String("agent", "bin/tcpha-agent", "tcpha-agent `binary`")
	smoke := flag.Bool("smoke", false, "a few seconds per workload: prove the harness, do not measure")
	out := flag.String("out", "docs/benchmarks.md", "report `file` (empty: stdout only)")
	chart := flag.String("chart", "docs/benchmarks.png", "chart `file` (PNG)")
	profile := flag.String("profile", "", "save CPU profiles of the FE and be1 agents taken during (a) and (g), and the deliver workload's (a), to `dir`")
	only := flag.String("only", "", "comma-separated `workloads` to run (a,b,c,i,sync,d,e,f,g,h,flat,idle,j,k,l,deliver; default all); "+
		"HTTPS ones alone (j,k,l) rewrite only the HTTPS part of -out")
	fes := flag.String("fe", "", "comma-separated `front ends` to run (tcpha,haproxy,nginx,direct,haproxy-sni,haproxy-tls,nginx-preread; default all)")
	secs := flag.Int("seconds", 0, "seconds per wrk workload (default 10, 1 with -smoke)")
	note := flag.String("note", "", "a `sentence` said next to the HTTPS figures (how busy the machine was)")
	deliver := flag.String("deliver", "relay", "the BEs' [be] `deliver` (relay or socket; socket sets [fe] phttp = single)")
	flag.Parse()
	p := params{wrkSecs: 10, tlsSecs: 10, flatTotal: 60 * time.Second, flatWindow: 10 * time.Second, bigMB: 200, ttfbN: 300,
		idleConns: 10000, profileDir: *profile, sizesKB: bench.SizesKB}
	if *smoke {
		// A second per point, and (i) at two sizes, one below and one
		// above the crossover's target: the smoke run proves the harness
		// within the suite's budget (issue 14), it does not measure.
		p = params{smoke: true, wrkSecs: 1, tlsSecs: 1, flatTotal: 2 * time.Second, flatWindow: time.Second, bigMB: 20,
			ttfbN: 30, idleConns: 500, profileDir: *profile, sizesKB: []int{1, 64}}
	}
	if *secs > 0 {
		p.wrkSecs, p.tlsSecs = *secs, *secs
	}
	p.only, p.fes = set(*only), set(*fes)
	if p.deliver = *deliver; p.deliver != "relay" && p.deliver != "socket" {
		fail(fmt.Errorf("-deliver %q: want relay or socket", p.deliver))
	}
	if os.Geteuid() != 0 {
		fail(errors.New("needs root: it creates network namespaces"))
	}
	abs, err := filepath.Abs(*agent)
	if err != nil {
		fail(err)
	}
	if _, err := os.Stat(abs); err != nil {
		fail(fmt.Errorf("agent binary: %w (run `make build`)", err))
	}
	run, err := runBench(abs, p)
	if err != nil {
		fail(err)
	}
	if *note != "" {
		run.HTTPSNotes = append(run.HTTPSNotes, *note)
	}
	if p.httpsOnly() {
		// The other workloads' figures and chart stay as the last full
		// run left them.
		md := run.HTTPSMarkdown()
		if *out != "" {
			old, err := os.ReadFile(*out)
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				fail(err)
			}
			if err := os.WriteFile(*out, []byte(bench.Splice(string(old), md)), 0o644); err != nil {
				fail(err)
			}
			fmt.Printf("== rewrote the HTTPS part of %s\n", *out)
		}
		fmt.Println()
		fmt.Print(md)
		return
	}
	chartRef := ""
	if *chart != "" {
		png, err := run.Chart()
		if err != nil {
			fail(err)
		}
		if err := os.WriteFile(*chart, png, 0o644); err != nil {
			fail(err)
		}
		chartRef = filepath.Base(*chart)
	}
	md := run.Markdown(chartRef)
	if *out != "" {
		if err := os.WriteFile(*out, []byte(md), 0o644); err != nil {
			fail(err)
		}
		fmt.Printf("== wrote %s and %s\n", *out, *chart)
	}
	fmt.Println()
	fmt.Print(md)
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "tcpha-bench: %v\n", err)
	os.Exit(1)
}

// frontEnd is one way in for the client.
type frontEnd struct {
	name string
	base string     // URL prefix
	pid  func() int // the FE's process (its tree is counted); nil: none
	// accept is tcpha's [fe] accept for this front end ("": not tcpha);
	// the FE agent is restarted when it changes (it needs an upgrade).
	accept string
}

type bencher struct {
	c   *cluster.Cluster
	p   params
	run *bench.Run
	fes []frontEnd
	// accept is the FE agent's [fe] accept now; deliverFE the FE lines
	// -deliver adds.
	accept, deliverFE string
	// tlsFes are the ways in over HTTPS, for (j), (k) and (l).
	tlsFes []frontEnd
	// syncOn gives the FE [fe] syncpeer = fe2 at its next start (the
	// sync workload).
	syncOn *atomic.Bool
}

func runBench(agent string, p params) (*bench.Run, error) {
	fmt.Println("== building the cluster: client, FE, be1, be2 (nginx on each BE, HTTP and HTTPS), fe2 (the sync workload's standby), deliver =", p.deliver)
	syncOn := &atomic.Bool{}
	deliverFE, deliverBE := "", ""
	if p.deliver == "socket" {
		deliverFE, deliverBE = "phttp = single\n", "deliver = socket\n"
	}
	c, err := cluster.New(cluster.Options{
		Agent: agent, BEs: 2, Secret: "bench-cluster-secret",
		// TLS without SNI (wrk names the VIP's address) takes the first
		// rule without host=: the \.bin$ rule sends it to be1, like
		// every other way in.
		Rules:     []string{`rule = be1 \.bin$`, `rule = be2 \.jpg$`, `rule = be1 .*`},
		PublicWWW: true, Metrics: true, NoAccessLog: true, TLS: true,
		// Per-connection lines off: the bench measures the default path.
		// A short drain: the FE agent restarts between accept modes
		// (use); TLS only with accept = fe, which (j), (k) and (l) use.
		FEExtra: feExtra("fe") + deliverFE, BEExtra: deliverBE,
		FE2: true,
		Edit: func(host, conf string) string {
			switch {
			case host == "fe2":
				// A standby that never gets the VIP: it only applies the
				// stream.
				return conf + "vip = keepalived\nsyncpeer = " + cluster.FEIP + "\n"
			case host == "fe" && syncOn.Load():
				return conf + "syncpeer = " + cluster.FE2IP + "\n"
			case strings.HasPrefix(host, "be"):
				mode, _ := beDeliver.Load().(string)
				return withDeliver(conf, mode) // the deliver workload
			}
			return conf
		},
	})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() { <-sig; c.Close(); os.Exit(130) }()

	for _, f := range []struct {
		name string
		size int
	}{{"1k.bin", 1 << 10}, {"1m.bin", 1 << 20}, {"big.bin", p.bigMB << 20}, {"img/1k.jpg", 1 << 10}, {"img/100k.jpg", 100 << 10}, {"img/1m.jpg", 1 << 20}} {
		data := make([]byte, f.size)
		rand.Read(data)
		for _, be := range []string{"be1", "be2"} {
			if err := os.WriteFile(filepath.Join(c.WWW(be), f.name), data, 0o644); err != nil {
				return nil, err
			}
		}
	}
	// (i)'s responses, one file per size.
	for _, kb := range p.sizesKB {
		data := make([]byte, kb<<10)
		rand.Read(data)
		for _, be := range []string{"be1", "be2"} {
			if err := os.MkdirAll(filepath.Join(c.WWW(be), "i"), 0o755); err != nil {
				return nil, err
			}
			if err := os.WriteFile(filepath.Join(c.WWW(be), "i", fmt.Sprintf("%dk.bin", kb)), data, 0o644); err != nil {
				return nil, err
			}
		}
	}
	for _, h := range []string{"be1", "be2", "fe"} {
		if err := c.StartAgent(h); err != nil {
			return nil, err
		}
	}
	// The agents log at info, like a production default.
	b := &bencher{c: c, p: p, run: &bench.Run{Date: time.Now(), Smoke: p.smoke, FlatWindow: p.flatWindow}, accept: "fe", deliverFE: deliverFE, syncOn: syncOn}
	haproxy, err := b.startHAProxy()
	if err != nil {
		return nil, err
	}
	nginx, err := b.startNginxProxy()
	if err != nil {
		return nil, err
	}
	vip := "http://" + cluster.VIP
	for _, fe := range []frontEnd{
		{bench.TCPHA, vip, func() int { return c.AgentPID("fe") }, "fe"},
		{bench.TCPHABE, vip, func() int { return c.AgentPID("fe") }, "be"},
		{bench.HAProxy, vip + ":8081", func() int { return haproxy }, ""},
		{bench.Nginx, vip + ":8082", func() int { return nginx }, ""},
		{bench.Direct, "http://" + c.BEs[0].IP, nil, ""},
	} {
		if len(p.fes) == 0 || p.fes[fe.name] {
			b.fes = append(b.fes, fe)
		}
	}
	tvip := "https://" + cluster.VIP
	for _, fe := range []frontEnd{
		{bench.TCPHA, tvip, func() int { return c.AgentPID("fe") }, "fe"},
		{bench.HAProxySNI, tvip + ":8443", func() int { return haproxy }, ""},
		{bench.HAProxyTLS, tvip + ":8444", func() int { return haproxy }, ""},
		{bench.NginxPreread, tvip + ":8445", func() int { return nginx }, ""},
		{bench.Direct, "https://" + c.BEs[0].IP, nil, ""},
	} {
		if len(p.fes) == 0 || p.fes[fe.name] {
			b.tlsFes = append(b.tlsFes, fe)
		}
	}
	// HTTPS first: its tcpha runs accept = fe, the mode the agent started
	// in.
	for _, fe := range append(slices.Clone(b.tlsFes), b.inTurn()...) {
		if err := b.use(fe); err != nil {
			return nil, err
		}
	}
	b.describe()
	for _, w := range []string{"a", "b", "c"} {
		if !p.runs(w) {
			continue
		}
		for _, fe := range b.inTurn() {
			if err := b.use(fe); err != nil {
				return nil, err
			}
			r, err := b.wrk(fe, w)
			if err != nil {
				return nil, err
			}
			b.run.Results = append(b.run.Results, r)
			if w == "a" && fe.name == bench.TCPHABE {
				// Rules under which either BE serves everything: every
				// connection lands on its BE.
				r, err := b.anyBE(fe, w, b.wrk)
				if err != nil {
					return nil, err
				}
				b.run.Results = append(b.run.Results, r)
				fmt.Printf("   (a) %-8s %9.0f req/s  FE CPU/req %v\n", r.FrontEnd, r.RPS, r.CPUPerRequest())
			}
			fmt.Printf("   (%s) %-8s %9.0f req/s  p50 %-9v p99 %-9v FE CPU/req %-9v machine CPU/req %v", w, fe.name, r.RPS,
				r.P50, r.P99, r.CPUPerRequest(), time.Duration(r.MachineCPU/float64(max(r.Requests, 1))*1e9))
			if r.HandoffP99 > 0 {
				fmt.Printf("  handoff p50 %v p99 %v", r.HandoffP50, r.HandoffP99)
			}
			fmt.Println()
		}
	}
	if p.runs("sync") && slices.ContainsFunc(b.fes, func(fe frontEnd) bool { return fe.name == bench.TCPHA }) {
		if err := b.syncCost(); err != nil {
			return nil, err
		}
	}
	if p.runs("i") {
		if err := b.sizes(); err != nil {
			return nil, err
		}
	}
	for _, w := range []string{"f", "g", "h"} {
		if !p.runs(w) {
			continue
		}
		if err := b.alternating(w); err != nil {
			return nil, err
		}
	}
	for _, fe := range b.inTurn() {
		if !p.runs("d") {
			break
		}
		if err := b.use(fe); err != nil {
			return nil, err
		}
		r, err := b.download(fe, "d")
		if err != nil {
			return nil, err
		}
		b.run.Results = append(b.run.Results, r)
		fmt.Printf("   (d) %-8s %6.2f s  %6.0f MB/s  FE CPU %.3f s\n", fe.name, r.Seconds, r.RespBytes/1e6/r.Seconds, r.FECPU)
	}
	for _, fe := range b.inTurn() {
		if !p.runs("e") {
			break
		}
		if err := b.use(fe); err != nil {
			return nil, err
		}
		r, err := b.ttfb(fe)
		if err != nil {
			return nil, err
		}
		b.run.Results = append(b.run.Results, r)
		fmt.Printf("   (e) %-8s TTFB p50 %v p99 %v\n", fe.name, r.TTFB50, r.TTFB99)
		if fe.name == bench.TCPHABE {
			r, err := b.anyBE(fe, "e", func(fe frontEnd, _ string) (bench.Result, error) { return b.ttfb(fe) })
			if err != nil {
				return nil, err
			}
			b.run.Results = append(b.run.Results, r)
			fmt.Printf("   (e) %-8s TTFB p50 %v p99 %v\n", r.FrontEnd, r.TTFB50, r.TTFB99)
		}
	}
	// (j), (k), (l), (flat) and (idle) measure tcpha with accept = fe.
	if err := b.use(frontEnd{name: bench.TCPHA, base: vip, accept: "fe"}); err != nil {
		return nil, err
	}
	for _, w := range []string{"j", "k"} {
		if !p.runs(w) {
			continue
		}
		for _, fe := range b.tlsFes {
			r, err := b.wrk(fe, w)
			if err != nil {
				return nil, err
			}
			b.run.Results = append(b.run.Results, r)
			fmt.Printf("   (%s) %-14s %9.0f req/s  p50 %-9v p99 %-9v FE CPU/req %-9v errors %d\n", w, fe.name, r.RPS,
				r.P50, r.P99, r.CPUPerRequest(), r.Errors)
		}
	}
	for _, fe := range b.tlsFes {
		if !p.runs("l") {
			break
		}
		r, err := b.download(fe, "l")
		if err != nil {
			return nil, err
		}
		b.run.Results = append(b.run.Results, r)
		fmt.Printf("   (l) %-14s %6.2f s  %6.0f MB/s  FE CPU %.4f s\n", fe.name, r.Seconds, r.RespBytes/1e6/r.Seconds, r.FECPU)
	}
	if p.runs("flat") {
		if err := b.flat(); err != nil {
			return nil, err
		}
	}
	if p.runs("idle") {
		if err := b.idle(); err != nil {
			b.run.Notes = append(b.run.Notes, "idle connections: "+err.Error())
		}
	}
	if p.runs("deliver") && slices.ContainsFunc(b.fes, func(fe frontEnd) bool { return fe.name == bench.TCPHA }) {
		if err := b.deliverCost(); err != nil {
			return nil, err
		}
	}
	return b.run, nil
}

func (b *bencher) describe() {
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	cpu := "?"
	if f, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(f), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	b.run.Machine = fmt.Sprintf("Linux %s, %d × %s", strings.TrimSpace(string(kernel)), runtime.NumCPU(), cpu)
	for _, t := range [][]string{{"haproxy", "-v"}, {"nginx", "-v"}, {"wrk", "-v"}, {"curl", "--version"}} {
		out, _ := exec.Command(t[0], t[1:]...).CombinedOutput()
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		if t[0] == "haproxy" {
			line, _, _ = strings.Cut(line, " - ")
		}
		if t[0] == "wrk" {
			line, _, _ = strings.Cut(line, " Copyright")
		}
		if t[0] == "curl" {
			f := strings.Fields(line)
			line = strings.Join(f[:min(2, len(f))], " ")
		}
		b.run.Tools = append(b.run.Tools, line)
	}
	b.run.Tools = append(b.run.Tools, runtime.Version())
	b.run.Params = fmt.Sprintf("wrk `-t2 -c32` for (a), (b), (f), (g) and (h), `-t2 -c8` for (c), %d s each; (d) %d MB; (e) %d connections; "+
		"(f)'s switches %d requests on one connection after its load; "+
		"tcpha with its defaults (connperbe 2, maxclients 256, loglevel 4, phttp multi)", b.p.wrkSecs, b.p.bigMB, b.p.ttfbN, max(b.p.ttfbN/2, 10))
	b.run.HTTPSParams = fmt.Sprintf("wrk `-t2 -c32 -H 'Connection: close'` for (j) (a full TLS handshake per connection: wrk resumes no sessions), "+
		"`-t2 -c8` for (k), %d s each; (l) one %d MB download (curl -k)", b.p.tlsSecs, b.p.bigMB)
}

func (b *bencher) startHAProxy() (int, error) {
	// HAProxy reads the certificate and its key from one file.
	pem := filepath.Join(b.c.Dir, "haproxy.pem")
	var both []byte
	for _, f := range []string{b.c.TLSCert(), b.c.TLSKey()} {
		x, err := os.ReadFile(f)
		if err != nil {
			return 0, fmt.Errorf("haproxy certificate: %w", err)
		}
		both = append(both, x...)
	}
	if err := os.WriteFile(pem, both, 0o600); err != nil {
		return 0, fmt.Errorf("haproxy certificate: %w", err)
	}
	// maxconn needs two descriptors per connection; 9000 fits the 20000
	// hard limit of the machines this project runs on.
	conf := fmt.Sprintf(`global
	maxconn 9000
defaults
	mode http
	timeout connect 5s
	timeout client 60s
	timeout server 60s
	timeout http-keep-alive 60s
	http-reuse always
frontend fe
	bind %[1]s:8081
	acl jpg path_end .jpg
	use_backend be2 if jpg
	default_backend be1
backend be1
	server be1 %[2]s:80
backend be2
	server be2 %[3]s:80
# HTTPS passed through, routed on the ClientHello's SNI.
frontend fe_sni
	mode tcp
	bind %[1]s:8443
	tcp-request inspect-delay 5s
	tcp-request content accept if { req.ssl_hello_type 1 }
	use_backend be2_tls if { req.ssl_sni -i b.example }
	default_backend be1_tls
backend be1_tls
	mode tcp
	server be1 %[2]s:443
backend be2_tls
	mode tcp
	server be2 %[3]s:443
# HTTPS terminated here, plain HTTP to the BEs reused.
frontend fe_tls
	bind %[1]s:8444 ssl crt %[4]s alpn http/1.1
	acl jpg path_end .jpg
	use_backend be2 if jpg
	default_backend be1
`, cluster.VIP, b.c.BEs[0].IP, b.c.BEs[1].IP, pem)
	path := filepath.Join(b.c.Dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return 0, err
	}
	cmd, err := b.c.StartDaemon("fe", "haproxy", "haproxy", "-db", "-f", path)
	if err != nil {
		return 0, err
	}
	return cmd.Process.Pid, nil
}

func (b *bencher) startNginxProxy() (int, error) {
	d := filepath.Join(b.c.Dir, "proxy")
	if err := os.MkdirAll(d, 0o755); err != nil {
		return 0, err
	}
	// The stream module is Debian's libnginx-mod-stream (scripts/deps.sh).
	conf := fmt.Sprintf(`load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
worker_rlimit_nofile 65536;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 32768; }
http {
	access_log off;
	keepalive_requests 1000000;
	proxy_http_version 1.1;
	proxy_set_header Connection "";
	proxy_max_temp_file_size 0;
	upstream be1 { server %[3]s:80; keepalive 128; }
	upstream be2 { server %[4]s:80; keepalive 128; }
	server {
		listen %[2]s:8082;
		location ~ \.jpg$ { proxy_pass http://be2; }
		location / { proxy_pass http://be1; }
	}
}
# HTTPS passed through, routed on the ClientHello's SNI.
stream {
	map $ssl_preread_server_name $tlsbe { b.example be2; default be1; }
	upstream be1 { server %[3]s:443; }
	upstream be2 { server %[4]s:443; }
	server {
		listen %[2]s:8445;
		ssl_preread on;
		proxy_pass $tlsbe;
	}
}
`, d, cluster.VIP, b.c.BEs[0].IP, b.c.BEs[1].IP)
	path := filepath.Join(d, "nginx.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		return 0, err
	}
	cmd, err := b.c.StartDaemon("fe", "nginx-proxy", "nginx", "-c", path, "-e", filepath.Join(d, "error.log"), "-g", "daemon off;")
	if err != nil {
		return 0, err
	}
	return cmd.Process.Pid, nil
}

func (b *bencher) waitUp(fe frontEnd) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		out, err := b.c.Output(ctx, "client", "curl", "-s", "-k", "-o", "/dev/null", "-w", "%{http_code}", fe.base+"/1k.bin")
		cancel()
		if err == nil && out == "200" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s does not answer at %s: %q %v", fe.name, fe.base, out, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sample is what is read before and after a load.
type sample struct {
	t        time.Time
	feCPU    float64
	machine  float64
	rx, tx   uint64
	hist     bench.Histogram
	handoffs float64
}

func (b *bencher) sample(fe frontEnd) sample {
	s := sample{t: time.Now(), feCPU: math.NaN()}
	if fe.pid != nil {
		s.feCPU = bench.TreeCPU(fe.pid())
	}
	s.machine, _ = bench.MachineBusy()
	s.rx, _ = b.c.Counter("fe", "rx_bytes")
	s.tx, _ = b.c.Counter("fe", "tx_bytes")
	if fe.name == bench.TCPHA {
		m := b.metrics("fe")
		s.hist = bench.ParseHistogram(m, "tcpha_handoff_duration_seconds")
		s.handoffs = bench.Counter(m, `tcpha_handoffs_total{result="ok"}`)
	}
	return s
}

func (b *bencher) metrics(host string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, _ := b.c.Output(ctx, host, "curl", "-s", "http://"+cluster.MetricsAddr+"/metrics")
	return out
}

// result turns two samples around a load into a Result.
func (b *bencher) result(fe frontEnd, w string, s0, s1 sample) bench.Result {
	r := bench.Result{
		FrontEnd: fe.name, Workload: w, Seconds: s1.t.Sub(s0.t).Seconds(),
		FECPU: s1.feCPU - s0.feCPU, MachineCPU: s1.machine - s0.machine,
		FEIn: s1.rx - s0.rx, FEOut: s1.tx - s0.tx,
	}
	if fe.pid != nil {
		r.RSS, _ = bench.RSS(fe.pid())
	}
	if fe.name == bench.TCPHA && s1.hist != nil {
		h := s1.hist.Sub(s0.hist)
		r.HandoffP50, r.HandoffP99 = h.Quantile(0.5), h.Quantile(0.99)
	}
	return r
}

func (b *bencher) wrk(fe frontEnd, w string) (bench.Result, error) {
	secs := b.p.wrkSecs
	if bench.IsHTTPS(w) {
		secs = b.p.tlsSecs
	}
	args := []string{"wrk", "-t2", "-c32", "-d", strconv.Itoa(secs) + "s", "--latency"}
	path := "/1k.bin"
	switch w {
	case "a", "j":
		args = append(args, "-H", "Connection: close")
	case "c", "k":
		args[2], path = "-c8", "/1m.bin"
	}
	args = append(args, fe.base+path)
	return b.load(fe, w, args, b.profiles(fe, w))
}

// syncCost runs (a)'s load through tcpha without [fe] syncpeer and then
// with it, fe2 a standby applying the stream (issue 17: FE CPU per handoff
// at most 1.1×), and puts the FE back as it was.
func (b *bencher) syncCost() error {
	fe := frontEnd{bench.TCPHA, "http://" + cluster.VIP, func() int { return b.c.AgentPID("fe") }, "fe"}
	if err := b.use(fe); err != nil {
		return err
	}
	off, err := b.wrk(fe, "a")
	if err != nil {
		return err
	}
	if err := b.setSync(true); err != nil {
		return err
	}
	on, err := b.wrk(fe, "a")
	if st, serr := b.c.Admin("fe", "status"); serr == nil {
		for l := range strings.Lines(st) {
			if strings.Contains(l, " sync peer=") {
				fmt.Printf("   (sync) the FE after the load: %s", strings.TrimSpace(l)+"\n")
			}
		}
	}
	if err := errors.Join(err, b.setSync(false)); err != nil {
		return err
	}
	off.Workload, on.Workload = "sync-off", "sync-on"
	b.run.Results = append(b.run.Results, off, on)
	fmt.Printf("   (sync) tcpha without syncpeer %6.0f req/s FE CPU/req %-9v with %6.0f req/s FE CPU/req %v\n",
		off.RPS, off.CPUPerRequest(), on.RPS, on.CPUPerRequest())
	return nil
}

// setSync restarts the FE with or without [fe] syncpeer, with fe2's agent
// running as its standby while it syncs.
func (b *bencher) setSync(on bool) error {
	b.syncOn.Store(on)
	if err := b.c.StopAgent("fe", syscall.SIGTERM); err != nil {
		return err
	}
	if !on {
		if err := b.c.StopAgent("fe2", syscall.SIGTERM); err != nil {
			return err
		}
		return b.c.StartAgent("fe")
	}
	if err := b.c.StartAgent("fe2"); err != nil {
		return err
	}
	if err := b.c.StartAgent("fe"); err != nil {
		return err
	}
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if st, _ := b.c.Admin("fe", "status"); strings.Contains(st, "active session=up") {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("sync workload: the FE's sync session to fe2 did not come up in 15 s")
		}
	}
}

// load runs wrk with args through fe, sampling the FE around it; prof, if
// set, waits for profiles taken meanwhile.
func (b *bencher) load(fe frontEnd, w string, args []string, prof func() error) (bench.Result, error) {
	s0 := b.sample(fe)
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(b.p.wrkSecs+60)*time.Second)
	out, err := b.c.Output(ctx, "client", args...)
	cancel()
	s1 := b.sample(fe)
	if prof != nil {
		if perr := prof(); perr != nil {
			b.run.Notes = append(b.run.Notes, "profiles: "+perr.Error())
		}
	}
	if err != nil {
		return bench.Result{}, fmt.Errorf("wrk through %s: %w\n%s", fe.name, err, out)
	}
	wr, err := bench.ParseWrk(out)
	if err != nil {
		return bench.Result{}, fmt.Errorf("%s: %w", fe.name, err)
	}
	r := b.result(fe, w, s0, s1)
	r.Requests, r.RPS, r.P50, r.P99 = wr.Requests, wr.RPS, wr.P50, wr.P99
	r.RespBytes, r.Errors, r.Seconds = wr.BytesRead, wr.SocketErrors+wr.Non2xx, wr.Duration.Seconds()
	return r, nil
}

// profiles starts CPU profiles of the FE and be1 agents for tcpha's runs
// of (a) and (g), when asked for, and returns what waits for them.
func (b *bencher) profiles(fe frontEnd, w string) func() error {
	if fe.accept == "" || w != "a" && w != "g" || b.p.profileDir == "" {
		return nil
	}
	return b.startProfiles(strings.ReplaceAll(fe.name, " ", "-") + "-" + w)
}

// startProfiles fetches CPU profiles from the FE and be1 agents while the
// load of workload w runs, and returns a function that waits for them.
func (b *bencher) startProfiles(w string) func() error {
	secs := max(1, b.p.wrkSecs-1)
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, host := range []string{"fe", "be1"} {
		wg.Go(func() {
			dst := filepath.Join(b.p.profileDir, host+"-"+w+".pprof")
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+30)*time.Second)
			defer cancel()
			cmd := b.c.Exec(ctx, host, "curl", "-s", "-o", dst,
				fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", cluster.PprofAddr, secs))
			if out, err := cmd.CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("%s: %v %s", host, err, out)
			}
		})
	}
	os.MkdirAll(b.p.profileDir, 0o755)
	return func() error { wg.Wait(); return errors.Join(errs...) }
}

// download is (d), or (l) over HTTPS: one big.bin with curl.
func (b *bencher) download(fe frontEnd, w string) (bench.Result, error) {
	s0 := b.sample(fe)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	out, err := b.c.Output(ctx, "client", "curl", "-sS", "-k", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", fe.base+"/big.bin")
	cancel()
	s1 := b.sample(fe)
	if err != nil || !strings.HasPrefix(out, "200 ") {
		return bench.Result{}, fmt.Errorf("download through %s: %q %v", fe.name, out, err)
	}
	r := b.result(fe, w, s0, s1)
	r.Requests = 1
	r.RespBytes, _ = strconv.ParseFloat(strings.Fields(out)[1], 64)
	if r.RespBytes != float64(b.p.bigMB<<20) {
		r.Errors = 1
	}
	r.RPS = 1 / r.Seconds
	return r, nil
}

func (b *bencher) ttfb(fe frontEnd) (bench.Result, error) {
	args := []string{"curl", "-sS", "-H", "Connection: close", "-w", "%{http_code} %{time_starttransfer} %{time_total}\n"}
	for range b.p.ttfbN {
		args = append(args, "-o", "/dev/null", fe.base+"/1k.bin")
	}
	s0 := b.sample(fe)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	out, err := b.c.Output(ctx, "client", args...)
	cancel()
	s1 := b.sample(fe)
	if err != nil {
		return bench.Result{}, fmt.Errorf("curl through %s: %v", fe.name, err)
	}
	r := b.result(fe, "e", s0, s1)
	var ttfb, total []time.Duration
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 3 {
			continue
		}
		if f[0] != "200" {
			r.Errors++
			continue
		}
		a, _ := strconv.ParseFloat(f[1], 64)
		t, _ := strconv.ParseFloat(f[2], 64)
		ttfb = append(ttfb, time.Duration(a*1e9))
		total = append(total, time.Duration(t*1e9))
	}
	r.Requests = int64(len(ttfb))
	r.TTFB50, r.TTFB99 = bench.Quantile(ttfb, 0.5), bench.Quantile(ttfb, 0.99)
	r.P50, r.P99 = bench.Quantile(total, 0.5), bench.Quantile(total, 0.99)
	r.RespBytes = float64(r.Requests) * 1024
	return r, nil
}

// alternateScript makes wrk's keep-alive connections alternate between
// be1's content and be2's images.
// Requests of workloads (f), every request for the other BE, (g), pages:
// one of be1's followed by eight images of be2's, and (h), media: one of
// be1's followed by four 1 MB images of be2's.
var workloadPaths = map[string][]string{
	"f": {"/1k.bin", "/img/1k.jpg", "/1k.bin", "/img/100k.jpg"},
	"g": {"/1k.bin", "/img/1k.jpg", "/img/1k.jpg", "/img/100k.jpg", "/img/1k.jpg", "/img/1k.jpg", "/img/1k.jpg", "/img/100k.jpg", "/img/1k.jpg"},
	"h": {"/1k.bin", "/img/1m.jpg", "/img/1m.jpg", "/img/1m.jpg", "/img/1m.jpg"},
}

// pathScript is a wrk script that asks for paths in turn, on each
// connection.
func pathScript(paths []string) string {
	return `local paths = {"` + strings.Join(paths, `", "`) + `"}
local i = 0
request = function()
	i = i + 1
	return wrk.format("GET", paths[(i % #paths) + 1])
end
`
}

// alternating is workload (f), (g) or (h): each front end under keep-alive
// load whose requests go to both BEs (scripts), tcpha three times (phttp =
// multi, the default, then single and forward, switched by reloads); for
// (f) also the time to first byte of the requests that switch BEs on a held
// connection: for multi, the migration latency.
func (b *bencher) alternating(w string) error {
	script := filepath.Join(b.c.Dir, w+".lua")
	if err := os.WriteFile(script, []byte(pathScript(workloadPaths[w])), 0o644); err != nil {
		return err
	}
	run := func(fe frontEnd) error {
		r, err := b.wrkScript(fe, w, script)
		if err != nil {
			return err
		}
		if w == "f" {
			// Unloaded: the agents' and servers' work left from the load
			// (closing connections, garbage collection) settles first.
			settle := 2 * time.Second
			if b.p.smoke {
				settle = 200 * time.Millisecond
			}
			time.Sleep(settle)
			if err := b.switches(fe, &r); err != nil {
				return err
			}
		}
		b.run.Results = append(b.run.Results, r)
		fmt.Printf("   (%s) %-14s %9.0f req/s  p50 %-9v p99 %-9v switch TTFB p50 %-9v p99 %-9v right BE %d/%d\n", w, fe.name, r.RPS,
			r.P50, r.P99, r.TTFB50, r.TTFB99, r.RightBE, r.Switches)
		return nil
	}
	for _, fe := range b.inTurn() {
		if err := b.use(fe); err != nil {
			return err
		}
		if err := run(fe); err != nil {
			return err
		}
		if fe.name != bench.TCPHA {
			continue
		}
		for _, v := range []struct{ mode, name string }{{"single", bench.TCPHASingle}, {"forward", bench.TCPHAForward}} {
			if err := b.setPHTTP(v.mode); err != nil {
				return err
			}
			other := fe
			other.name = v.name
			err := run(other)
			if rerr := b.setPHTTP("multi"); err == nil {
				err = rerr
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// inTurn is b.fes in the order to run a workload: tcpha in the accept
// mode the FE agent runs now first, then tcpha in the other, then the
// rest. Each workload then restarts the agent once rather than twice (a
// restart takes seconds: issue 14 had the smoke run over 3 minutes).
func (b *bencher) inTurn() []frontEnd {
	rank := func(fe frontEnd) int {
		switch fe.accept {
		case "":
			return 2
		case b.accept:
			return 0
		}
		return 1
	}
	out := slices.Clone(b.fes)
	slices.SortStableFunc(out, func(x, y frontEnd) int { return rank(x) - rank(y) })
	return out
}

// use readies fe: for tcpha, the FE agent in fe's accept mode, which
// takes a restart (accept needs an upgrade); then fe answers.
func (b *bencher) use(fe frontEnd) error {
	if fe.accept != "" && fe.accept != b.accept {
		fmt.Printf("== restarting the FE agent with accept = %s\n", fe.accept)
		// A short drain: nothing is left to drain between workloads.
		b.c.SetFEExtra(feExtra(fe.accept) + b.deliverFE)
		if err := b.c.StopAgent("fe", syscall.SIGTERM); err != nil {
			return err
		}
		if err := b.c.StartAgent("fe"); err != nil {
			return err
		}
		b.accept = fe.accept
	}
	if err := b.waitUp(fe); err != nil {
		return err
	}
	if fe.accept != "" {
		time.Sleep(time.Second) // the BEs' slots and sessions settle
	}
	return nil
}

// feExtra is the FE's config beside the cluster's for accept mode accept:
// TLS (the VIP's port 443) only with accept = fe, which refuses it.
func feExtra(accept string) string {
	extra := "drain = 1\naccept = " + accept + "\n"
	if accept == "fe" {
		extra += "tlsport = 443\n"
	}
	return extra
}

// sizes is workload (i): one-request connections over response sizes,
// through tcpha in both accept modes and HAProxy, for the size from which
// tcpha's FE CPU per request stays below HAProxy's (issue 14).
func (b *bencher) sizes() error {
	secs := max(1, b.p.wrkSecs/2)
	for _, fe := range b.inTurn() {
		if fe.name != bench.TCPHA && fe.name != bench.TCPHABE && fe.name != bench.HAProxy {
			continue
		}
		if err := b.use(fe); err != nil {
			return err
		}
		for _, kb := range b.p.sizesKB {
			w := bench.SizeWorkload(kb)
			args := []string{"wrk", "-t2", "-c32", "-d", strconv.Itoa(secs) + "s", "--latency", "-H", "Connection: close",
				fmt.Sprintf("%s/i/%dk.bin", fe.base, kb)}
			r, err := b.load(fe, w, args, nil)
			if err != nil {
				return err
			}
			b.run.Results = append(b.run.Results, r)
			fmt.Printf("   (i) %5d KB %-9s %7.0f req/s  FE CPU/req %v\n", kb, fe.name, r.RPS, r.CPUPerRequest())
		}
	}
	return nil
}

// anyBE runs workload w for fe (accept = be) under rules that let either
// BE serve the workloads' content (`.bin` and the catch-all name both),
// switched by a reload and back, as bench.TCPHABEAny: every connection
// lands on its BE.
func (b *bencher) anyBE(fe frontEnd, w string, run func(frontEnd, string) (bench.Result, error)) (bench.Result, error) {
	be1, be2 := b.c.BEs[0].IP, b.c.BEs[1].IP
	set := func(targets string) error {
		conf := b.c.ConfigFile("fe")
		text, err := os.ReadFile(conf)
		if err != nil {
			return err
		}
		re := regexp.MustCompile(`(?m)^rule = \S+ (\\\.bin\$|\.\*)$`)
		if len(re.FindAll(text, -1)) != 2 {
			return fmt.Errorf("no .bin and catch-all rules in %s", conf)
		}
		if err := os.WriteFile(conf, re.ReplaceAll(text, []byte("rule = "+targets+" $1")), 0o644); err != nil {
			return err
		}
		if _, err := b.c.Admin("fe", "reload"); err != nil {
			return err
		}
		time.Sleep(time.Second)
		return nil
	}
	if err := set(be1 + "," + be2); err != nil {
		return bench.Result{}, err
	}
	other := fe
	other.name = bench.TCPHABEAny
	r, err := run(other, w)
	if rerr := set(be1); err == nil {
		err = rerr
	}
	return r, err
}

// setPHTTP switches the FE's phttp with a reload, and gives the cluster
// frame a moment to reach the BEs.
func (b *bencher) setPHTTP(mode string) error {
	conf := b.c.ConfigFile("fe")
	text, err := os.ReadFile(conf)
	if err != nil {
		return err
	}
	lines := strings.Split(strings.TrimRight(string(text), "\n"), "\n")
	lines = slices.DeleteFunc(lines, func(l string) bool { return strings.HasPrefix(l, "phttp") })
	lines = append(lines, "phttp = "+mode) // [fe] is the file's last section
	if err := os.WriteFile(conf, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	if _, err := b.c.Admin("fe", "reload"); err != nil {
		return err
	}
	time.Sleep(time.Second)
	return nil
}

// wrkScript is wrk with a request script.
func (b *bencher) wrkScript(fe frontEnd, w, script string) (bench.Result, error) {
	args := []string{"wrk", "-t2", "-c32", "-d", strconv.Itoa(b.p.wrkSecs) + "s", "--latency", "-s", script, fe.base + "/"}
	return b.load(fe, w, args, b.profiles(fe, w))
}

// switches asks, on one keep-alive connection, for be1's and be2's content
// in turn, and records the time to first byte of the requests for be2's
// (the ones that switch BEs) and how many be2 served.
func (b *bencher) switches(fe frontEnd, r *bench.Result) error {
	n := max(b.p.ttfbN/2, 10)
	args := []string{"curl", "-sS", "-w", "%{http_code} %{time_starttransfer} %header{x-served-by}\n"}
	for range n {
		args = append(args, "-o", "/dev/null", fe.base+"/1k.bin", "-o", "/dev/null", fe.base+"/img/1k.jpg")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	out, err := b.c.Output(ctx, "client", args...)
	cancel()
	if err != nil {
		return fmt.Errorf("curl through %s: %v", fe.name, err)
	}
	var ttfb []time.Duration
	for i, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if i%2 == 0 || len(f) < 2 {
			continue // be1's requests
		}
		if f[0] != "200" {
			r.Errors++
			continue
		}
		t, _ := strconv.ParseFloat(f[1], 64)
		ttfb = append(ttfb, time.Duration(t*1e9))
		r.Switches++
		if len(f) == 3 && f[2] == "be2" {
			r.RightBE++
		}
	}
	r.TTFB50, r.TTFB99 = bench.Quantile(ttfb, 0.5), bench.Quantile(ttfb, 0.99)
	return nil
}

// flat runs (a) through tcpha for a long while and samples the FE's
// handoff counter per window: the rate must not decay as TIME_WAIT state
// piles up.
func (b *bencher) flat() error {
	fmt.Printf("== (a) through tcpha for %v, handoffs per %v\n", b.p.flatTotal, b.p.flatWindow)
	ctx, cancel := context.WithTimeout(context.Background(), b.p.flatTotal+time.Minute)
	defer cancel()
	cmd := b.c.Exec(ctx, "client", "wrk", "-t2", "-c32", "-d", fmt.Sprintf("%ds", int(b.p.flatTotal.Seconds())),
		"-H", "Connection: close", "http://"+cluster.VIP+"/1k.bin")
	cmd.Stdout = io.Discard
	if err := cmd.Start(); err != nil {
		return err
	}
	prev := bench.Counter(b.metrics("fe"), `tcpha_handoffs_total{result="ok"}`)
	prevT := time.Now()
	for range int(b.p.flatTotal / b.p.flatWindow) {
		time.Sleep(b.p.flatWindow)
		now := bench.Counter(b.metrics("fe"), `tcpha_handoffs_total{result="ok"}`)
		t := time.Now()
		b.run.Flat = append(b.run.Flat, (now-prev)/t.Sub(prevT).Seconds())
		prev, prevT = now, t
	}
	cmd.Wait()
	fmt.Printf("   %v\n", b.run.Flat)
	return nil
}

// idle opens many keep-alive connections through tcpha, each served one
// request and left open, and reads the agents' memory.
func (b *bencher) idle() error {
	n := b.p.idleConns
	fmt.Printf("== %d idle handed-off connections\n", n)
	fePID, bePID := b.c.AgentPID("fe"), b.c.AgentPID("be1")
	b.run.Idle.Conns = n
	b.run.Idle.FEBefore, _ = bench.RSS(fePID)
	b.run.Idle.BEBefore, _ = bench.RSS(bePID)
	start := time.Now()
	var conns sync.Map
	var opened, answered atomic.Int64
	var firstErr atomic.Value
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := range n {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			conn, err := b.c.Dial(ctx, "client", 0, cluster.VIP+":80")
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
				return
			}
			opened.Add(1)
			conns.Store(i, conn)
			conn.SetDeadline(time.Now().Add(20 * time.Second))
			fmt.Fprintf(conn, "GET /1k.bin HTTP/1.1\r\nHost: bench\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				firstErr.CompareAndSwap(nil, err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				answered.Add(1)
			} else {
				firstErr.CompareAndSwap(nil, fmt.Errorf("status %d, served by %q", resp.StatusCode, resp.Header.Get("X-Served-By")))
			}
		})
	}
	wg.Wait()
	b.run.Idle.Took = time.Since(start)
	time.Sleep(time.Second)
	b.run.Idle.FEAfter, _ = bench.RSS(fePID)
	b.run.Idle.BEAfter, _ = bench.RSS(bePID)
	b.run.Idle.Opened, b.run.Idle.Answered = int(opened.Load()), int(answered.Load())
	conns.Range(func(_, v any) bool { v.(interface{ Close() error }).Close(); return true })
	fmt.Printf("   %d opened, %d answered in %v; FE RSS %d → %d KiB, BE RSS %d → %d KiB\n", opened.Load(), answered.Load(),
		b.run.Idle.Took.Round(time.Millisecond), b.run.Idle.FEBefore>>10, b.run.Idle.FEAfter>>10,
		b.run.Idle.BEBefore>>10, b.run.Idle.BEAfter>>10)
	if err, _ := firstErr.Load().(error); err != nil {
		return fmt.Errorf("%d of %d answered; first error: %v", answered.Load(), n, err)
	}
	return nil
}
