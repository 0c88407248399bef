// Package cluster builds a tcpha cluster out of network namespaces on one
// machine: a switch (a bridge in its own namespace), a client, an FE and
// BEs, each with an eth0 on the bridge, nginx on every BE and, optionally,
// on the FE as its local node. The integration tests and `make demo` use it.
//
// Namespace names start with a prefix unique to the process, so parallel
// runs do not collide; Close removes everything, and is safe to call twice.
package nscluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"tcpha/admin"
)

// Addresses inside the cluster. They exist only in the namespaces the
// cluster creates.
const (
	Subnet    = "10.77.0.0/24"
	ClientIP  = "10.77.0.10"
	MalloryIP = "10.77.0.9"
	FEIP      = "10.77.0.2"
	// FE2IP is the second FE's, with Options.FE2.
	FE2IP = "10.77.0.3"
	VIP   = "10.77.0.100"
	Port  = 80
)

// BE describes one back end host.
type BE struct {
	Name  string // host name: be1, be2, ...
	IP    string
	UAddr string // unused address for its ARP filter
}

// DefaultSecret is the cluster secret when Options.Secret is empty.
const DefaultSecret = "nscluster-secret"

// Options shape a cluster.
type Options struct {
	Agent   string   // path of the tcpha-agent binary
	BEs     int      // number of BEs (1-9)
	Rules   []string // FE rule lines, e.g. `rule = be2 \.jpg$`; BE names are replaced by their IPs
	FEExtra string   // more [fe] lines
	BEExtra string   // more [be] lines
	// GlobalExtra is more [global] lines, for every agent.
	GlobalExtra string
	// Secret is the cluster's [global] secret; empty means DefaultSecret
	// (every agent that runs control sessions needs one).
	Secret   string
	LocalWWW bool // run nginx on the FE as its local node (redirectport 8080)
	// NginxWorkers is the BEs' nginx worker_processes (0: 1);
	// NginxListen is added to their `listen 127.0.0.1:80` (e.g.
	// "reuseport", "deferred").
	NginxWorkers int
	NginxListen  string
	// PublicWWW makes each BE's nginx also listen on the BE's own address,
	// port 80 (and 443 with TLS), for proxies and direct clients (the
	// bench).
	PublicWWW bool
	// Metrics serves each agent's /metrics on 127.0.0.1:9180 and its
	// profiles on 127.0.0.1:6060, inside its namespace.
	Metrics bool
	// NoAccessLog turns nginx's access logs off (they cost the bench).
	NoAccessLog bool
	// Mallory adds a second client host, "mallory", for attacks: a stranger
	// with an address of its own.
	Mallory bool
	// FE2 adds a second FE host, "fe2" (FE2IP), with the same [fe] as
	// "fe" but its own raddr; the BEs take control sessions from both
	// (feaddr lists both). Its agent is started like the others, with
	// StartAgent("fe2"); a pair of FEs needs [fe] vip = keepalived.
	FE2 bool
	// Notify gives each agent a NOTIFY_SOCKET, as systemd does, and keeps
	// what they send (Notifications).
	Notify bool
	// Watchdog, with Notify, is systemd's WatchdogSec for the agents
	// (WATCHDOG_USEC).
	Watchdog time.Duration
	// Registered names BEs the FE's config does not list: they register
	// themselves (dregister = 1) with their BERules.
	Registered []string
	// BERules are a BE's own `rule = ...` lines (BE names become IPs).
	BERules map[string][]string
	// Weights gives BEs a `weight=N` on their server lines.
	Weights map[string]int
	// Edit, if set, rewrites each host's config text before it is written.
	Edit func(host, conf string) string
	// TLS gives each BE's nginx a TLS server on 127.0.0.1:443 (ssl,
	// http2) with a self-signed certificate for a.example and b.example,
	// made by openssl for this cluster (TLSCert); off, to keep the other
	// tests fast.
	TLS bool
	// ProxyProtocol makes that TLS server expect a PROXY protocol header
	// and log the address it names ([be] proxyprotocol = on).
	ProxyProtocol bool
}

// MetricsAddr is where an agent serves /metrics inside its namespace when
// Options.Metrics is set.
const MetricsAddr = "127.0.0.1:9180"

// PprofAddr is where an agent serves /debug/pprof/ inside its namespace
// when Options.Metrics is set.
const PprofAddr = "127.0.0.1:6060"

// Cluster is a running namespace cluster.
type Cluster struct {
	Dir    string
	Prefix string
	BEs    []BE
	opts   Options

	mu      sync.Mutex
	agents  map[string]*agentProc
	nginx   []string // pid files
	daemons []*agentProc
	closed  bool
	notify  map[string]*net.UnixConn
	notes   map[string][]string
}

// New builds the cluster and starts nginx on the BEs; agents are started
// with StartAgent.
func New(opts Options) (c *Cluster, err error) {
	if opts.BEs < 1 || opts.BEs > 9 {
		return nil, fmt.Errorf("cluster: %d BEs (want 1-9)", opts.BEs)
	}
	dir, err := os.MkdirTemp("", "tcpha-cluster-")
	if err != nil {
		return nil, err
	}
	os.Chmod(dir, 0o755) // nginx workers run as an unprivileged user
	c = &Cluster{
		Dir:    dir,
		Prefix: fmt.Sprintf("tcpha%d-%d-", os.Getpid()%100000, time.Now().UnixNano()%10000),
		opts:   opts,
		agents: map[string]*agentProc{},
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	for i := 1; i <= opts.BEs; i++ {
		c.BEs = append(c.BEs, BE{Name: fmt.Sprintf("be%d", i), IP: fmt.Sprintf("10.77.0.%d", 10+i), UAddr: fmt.Sprintf("10.77.0.%d", 200+i)})
	}
	if err := c.build(); err != nil {
		return nil, err
	}
	if opts.Notify {
		if err := c.listenNotify(c.hosts()); err != nil {
			return nil, err
		}
	}
	if opts.TLS {
		if err := c.makeCert(); err != nil {
			return nil, err
		}
	}
	for _, b := range c.BEs {
		if err := c.StartWWW(b.Name); err != nil {
			return nil, err
		}
	}
	if opts.LocalWWW {
		if err := c.startNginx("fe", "127.0.0.1:8080"); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// NS returns the namespace name of a host.
func (c *Cluster) NS(host string) string { return c.Prefix + host }

func (c *Cluster) hosts() []string {
	h := []string{"client", "fe"}
	if c.opts.Mallory {
		h = append(h, "mallory")
	}
	if c.opts.FE2 {
		h = append(h, "fe2")
	}
	for _, b := range c.BEs {
		h = append(h, b.Name)
	}
	return h
}

func (c *Cluster) ip(host string) string {
	switch host {
	case "client":
		return ClientIP
	case "mallory":
		return MalloryIP
	case "fe":
		return FEIP
	case "fe2":
		return FE2IP
	}
	for _, b := range c.BEs {
		if b.Name == host {
			return b.IP
		}
	}
	return ""
}

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (c *Cluster) build() error {
	sw := c.NS("sw")
	steps := [][]string{
		{"ip", "netns", "add", sw},
		{"ip", "-n", sw, "link", "add", "br0", "type", "bridge"},
		{"ip", "-n", sw, "link", "set", "br0", "up"},
	}
	// The switch forwards frames and nothing else: without this, bridged
	// packets also run the netfilter IP hooks of the switch's namespace
	// (br_netfilter, on by default here), which no real switch does.
	for _, f := range []string{"iptables", "ip6tables", "arptables"} {
		steps = append(steps, []string{"ip", "netns", "exec", sw, "sysctl", "-qw", "net.bridge.bridge-nf-call-" + f + "=0"})
	}
	for i, h := range c.hosts() {
		ns, port := c.NS(h), fmt.Sprintf("p%d", i)
		steps = append(steps,
			[]string{"ip", "netns", "add", ns},
			[]string{"ip", "-n", ns, "link", "set", "lo", "up"},
			[]string{"ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", sw},
			[]string{"ip", "-n", sw, "link", "set", port, "master", "br0"},
			[]string{"ip", "-n", sw, "link", "set", port, "up"},
			[]string{"ip", "-n", ns, "addr", "add", c.ip(h) + "/24", "dev", "eth0"},
			[]string{"ip", "-n", ns, "link", "set", "eth0", "up"},
		)
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			return fmt.Errorf("build cluster: %w", err)
		}
	}
	return nil
}

// Exec returns a command that runs in host's namespace.
func (c *Cluster) Exec(ctx context.Context, host string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", c.NS(host)}, args...)...)
}

// Output runs a command in host's namespace and returns its stdout.
func (c *Cluster) Output(ctx context.Context, host string, args ...string) (string, error) {
	cmd := c.Exec(ctx, host, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s on %s: %w: %s", strings.Join(args, " "), host, err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// TLSCert is the cluster's self-signed certificate (PEM) when
// Options.TLS is set, for clients that verify.
func (c *Cluster) TLSCert() string { return filepath.Join(c.Dir, "tls.crt") }

// TLSKey is the private key of TLSCert, for servers that present it.
func (c *Cluster) TLSKey() string { return filepath.Join(c.Dir, "tls.key") }

// makeCert makes the certificate every BE's TLS server presents.
func (c *Cluster) makeCert() error {
	key := c.TLSKey()
	if err := run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
		"-subj", "/CN=a.example", "-addext", "subjectAltName=DNS:a.example,DNS:b.example",
		"-keyout", key, "-out", c.TLSCert()); err != nil {
		return fmt.Errorf("cluster certificate: %w", err)
	}
	return os.Chmod(key, 0o644) // nginx reads it as root, but keep the workers able to
}

// tlsServer is the TLS server block of a BE's nginx.
func (c *Cluster) tlsServer(host, www string) string {
	if !c.opts.TLS || host == "fe" {
		return ""
	}
	listen, realIP := "listen 127.0.0.1:443 ssl http2;", ""
	if c.opts.ProxyProtocol {
		listen = "listen 127.0.0.1:443 ssl http2 proxy_protocol;"
		realIP = "\t\treal_ip_header proxy_protocol;\n"
	}
	if c.opts.PublicWWW && !c.opts.ProxyProtocol {
		// The bench's TLS passthrough proxies and its direct client.
		for _, b := range c.BEs {
			if b.Name == host {
				listen += "\n\t\tlisten " + b.IP + ":443 ssl http2;"
			}
		}
	}
	return fmt.Sprintf(`	server {
		%s
%s		ssl_certificate %s;
		ssl_certificate_key %s;
		root %s;
		add_header X-Served-By %s always;
	}
`, listen, realIP, c.TLSCert(), c.TLSKey(), www, host)
}

// CheckLogMap is the nginx map the README shows for keeping the agents'
// web server checks (User-Agent tcpha-check) out of the access log; the
// cluster's nginx logs with `if=$tcpha_loggable`.
const CheckLogMap = `map $http_user_agent $tcpha_loggable {
		tcpha-check 0;
		default     1;
	}
`

// WWW is the document root of host's nginx.
func (c *Cluster) WWW(host string) string { return filepath.Join(c.Dir, host, "www") }

func (c *Cluster) startNginx(host string, listen ...string) error {
	d := filepath.Join(c.Dir, host)
	www := c.WWW(host)
	for _, sub := range []string{"img", "local"} {
		if err := os.MkdirAll(filepath.Join(www, sub), 0o755); err != nil {
			return err
		}
	}
	os.Chmod(d, 0o755)
	files := map[string]string{
		"index.html":       "index from " + host + "\n",
		"img/a.jpg":        "jpeg from " + host + "\n",
		"local/index.html": "local page from " + host + "\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(www, name), []byte(body), 0o644); err != nil {
			return err
		}
	}
	pid := filepath.Join(d, "nginx.pid")
	// The README's way of keeping the agents' web server checks out of
	// the access log (CheckLogMap), as an operator would write it.
	access := CheckLogMap + "\taccess_log " + d + "/access.log combined if=$tcpha_loggable;"
	if c.opts.NoAccessLog {
		access = "access_log off;"
	}
	var listens strings.Builder
	for _, l := range listen {
		fmt.Fprintf(&listens, "\t\tlisten %s;\n", l)
	}
	workers := 1
	if host != "fe" && c.opts.NginxWorkers > 0 {
		workers = c.opts.NginxWorkers
	}
	conf := fmt.Sprintf(`worker_processes %[8]d;
worker_rlimit_nofile 65536;
pid %[1]s/nginx.pid;
error_log %[1]s/nginx-error.log;
events { worker_connections 32768; }
http {
	%[5]s
	default_type application/octet-stream;
	sendfile on;
	keepalive_requests 1000000;
	keepalive_timeout 600s;
	# The relay's [be] forwardedfor = on names the client; without it
	# the client is the relay: 127.0.0.1, or the BE whose relay fetched
	# the request (phttp = forward).
	set_real_ip_from 127.0.0.1;
%[6]s	real_ip_header X-Forwarded-For;
	server {
%[2]s		root %[3]s;
		add_header X-Served-By %[4]s always;
		# A check path that answers 500 while the file sick exists
		# (TestHealthCheckExpect).
		location = /health {
			if (-f $document_root/sick) {
				return 500;
			}
			return 200 "ok\n";
		}
	}
%[7]s}
`, d, listens.String(), www, host, access, c.trustedRelays(), c.tlsServer(host, www), workers)
	cf := filepath.Join(d, "nginx.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		return err
	}
	if err := run("ip", "netns", "exec", c.NS(host), "nginx", "-e", filepath.Join(d, "nginx-error.log"), "-c", cf); err != nil {
		return fmt.Errorf("start nginx on %s: %w", host, err)
	}
	c.mu.Lock()
	if !slices.Contains(c.nginx, pid) {
		c.nginx = append(c.nginx, pid)
	}
	c.mu.Unlock()
	return nil
}

// trustedRelays are nginx's set_real_ip_from lines for the BEs' addresses.
func (c *Cluster) trustedRelays() string {
	var b strings.Builder
	for _, be := range c.BEs {
		fmt.Fprintf(&b, "\tset_real_ip_from %s;\n", be.IP)
	}
	return b.String()
}

// StopWWW stops host's nginx and waits until it is gone.
func (c *Cluster) StopWWW(host string) error {
	b, err := os.ReadFile(filepath.Join(c.Dir, host, "nginx.pid"))
	if err != nil {
		return fmt.Errorf("nginx on %s: %w", host, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return fmt.Errorf("nginx on %s: pid file: %w", host, err)
	}
	syscall.Kill(pid, syscall.SIGTERM)
	for deadline := time.Now().Add(10 * time.Second); running(pid); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return fmt.Errorf("nginx on %s (pid %d) still runs 10 s after SIGTERM", host, pid)
		}
	}
	return nil
}

// running tells whether pid is a live process. Once a test made this
// process a child subreaper (UpgradeAgentBySignal), the daemonized nginx
// masters started after it are its children: one that exited stays a
// zombie, which kill(pid, 0) still finds, until it is reaped here.
func running(pid int) bool {
	var ws unix.WaitStatus
	unix.Wait4(pid, &ws, unix.WNOHANG, nil) // ECHILD when not ours: fine
	return syscall.Kill(pid, 0) == nil
}

// StartWWW starts host's nginx again after StopWWW.
func (c *Cluster) StartWWW(host string) error {
	listen := []string{strings.TrimSpace("127.0.0.1:80 " + c.opts.NginxListen)}
	if c.opts.PublicWWW {
		listen = append(listen, c.ip(host)+":80")
	}
	return c.startNginx(host, listen...)
}

// ReloadWWW runs `nginx -s reload` for host's nginx: new workers, the old
// ones finish their requests and exit.
func (c *Cluster) ReloadWWW(host string) error {
	cf := filepath.Join(c.Dir, host, "nginx.conf")
	if out, err := exec.Command("ip", "netns", "exec", c.NS(host), "nginx", "-c", cf, "-s", "reload").CombinedOutput(); err != nil {
		return fmt.Errorf("reload nginx on %s: %w: %s", host, err, out)
	}
	return nil
}

// Config returns the agent config text for host.
func (c *Cluster) Config(host string) string {
	g := fmt.Sprintf("[global]\nloglevel = 5\nadmin = %s\n", c.AdminSocket(host))
	if c.opts.Metrics {
		g += fmt.Sprintf("metrics = %s\npprof = %s\n", MetricsAddr, PprofAddr)
	}
	secret := c.opts.Secret
	if secret == "" {
		secret = DefaultSecret
	}
	g += "secret = " + secret + "\n"
	g += c.opts.GlobalExtra
	s := g
	if host == "fe" || host == "fe2" {
		s += fmt.Sprintf("\n[fe]\nraddr = %s\nvaddr = %s\nport = %d\n", c.ip(host), VIP, Port)
		for _, b := range c.BEs {
			if slices.Contains(c.opts.Registered, b.Name) {
				continue
			}
			s += fmt.Sprintf("server = %s 666", b.IP)
			if w, ok := c.opts.Weights[b.Name]; ok {
				s += fmt.Sprintf(" weight=%d", w)
			}
			s += "\n"
		}
		for _, r := range c.opts.Rules {
			s += c.ruleLine(r) + "\n"
		}
		if len(c.opts.Registered) > 0 {
			s += "dregister = 1\n"
		}
		s += c.opts.FEExtra
	} else {
		feaddr := FEIP
		if c.opts.FE2 {
			feaddr += ", " + FE2IP
		}
		s += fmt.Sprintf("\n[be]\nraddr = %s\nuaddr = %s\nvaddr = %s\nfeaddr = %s\nport = 666\nredirectport = 80\n",
			c.ip(host), c.be(host).UAddr, VIP, feaddr) + c.opts.BEExtra
		if slices.Contains(c.opts.Registered, host) {
			s += "dregister = 1\n"
		}
		for _, r := range c.opts.BERules[host] {
			s += c.ruleLine(r) + "\n"
		}
	}
	if c.opts.Edit != nil {
		s = c.opts.Edit(host, s)
	}
	return s
}

// SetFEExtra replaces Options.FEExtra: the FE's config has them from its
// agent's next start.
func (c *Cluster) SetFEExtra(extra string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.opts.FEExtra = extra
}

// ruleLine turns the BE names in a rule's targets (`rule = be1,be2 ...`)
// into their addresses.
func (c *Cluster) ruleLine(r string) string {
	key, rest, ok := strings.Cut(r, "= ")
	if !ok {
		return r
	}
	targets, pattern, _ := strings.Cut(rest, " ")
	names := strings.Split(targets, ",")
	for i, n := range names {
		if ip := c.ip(n); ip != "" && strings.HasPrefix(n, "be") {
			names[i] = ip
		}
	}
	return key + "= " + strings.Join(names, ",") + " " + pattern
}

func (c *Cluster) be(host string) BE {
	for _, b := range c.BEs {
		if b.Name == host {
			return b
		}
	}
	return BE{}
}

// AdminSocket is the path of host's agent admin socket.
func (c *Cluster) AdminSocket(host string) string { return filepath.Join(c.Dir, host+".sock") }

// ConfigFile is the path of host's agent config; StartAgent writes it.
func (c *Cluster) ConfigFile(host string) string { return filepath.Join(c.Dir, host+".conf") }

// AgentLog is the path of host's agent log.
func (c *Cluster) AgentLog(host string) string { return filepath.Join(c.Dir, host+"-agent.log") }

// StartAgent starts tcpha-agent on host and waits until its admin socket
// answers.
func (c *Cluster) StartAgent(host string) error {
	p, err := c.spawnAgent(host)
	if err != nil {
		return err
	}
	return c.waitUp(host, p, nil)
}

// spawnAgent starts host's agent process with the cluster's config for it,
// and makes it the host's agent.
func (c *Cluster) spawnAgent(host string, args ...string) (*agentProc, error) {
	conf := c.ConfigFile(host)
	if err := os.WriteFile(conf, []byte(c.Config(host)), 0o644); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(c.AgentLog(host), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command("ip", append([]string{"netns", "exec", c.NS(host), c.opts.Agent, "-c", conf}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if c.notify != nil {
		cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+c.notifyPath(host))
		if c.opts.Watchdog > 0 {
			cmd.Env = append(cmd.Env, fmt.Sprintf("WATCHDOG_USEC=%d", c.opts.Watchdog.Microseconds()))
		}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start agent on %s: %w", host, err)
	}
	p := &agentProc{proc: cmd.Process, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	c.mu.Lock()
	c.agents[host] = p
	c.mu.Unlock()
	return p, nil
}

// waitUp waits up to 10 s, or 60 s with a predecessor (which must exit
// first), for p to answer on the admin socket.
func (c *Cluster) waitUp(host string, p *agentProc, old *agentProc) error {
	d := 10 * time.Second
	if old != nil {
		d = 60 * time.Second
	}
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			c.mu.Lock()
			delete(c.agents, host)
			c.mu.Unlock()
			return fmt.Errorf("agent on %s exited: %v; log:\n%s", host, p.err, c.tail(host))
		default:
		}
		oldGone := true
		if old != nil {
			select {
			case <-old.done:
			default:
				oldGone = false
			}
		}
		if oldGone {
			if _, err := c.Admin(host, "status"); err == nil {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("agent on %s did not come up in %v; log:\n%s", host, d, c.tail(host))
}

// UpgradeAgentBySignal upgrades host's agent in place, as systemd would
// (systemctl kill -s USR2): the agent starts its successor itself. The
// successor, orphaned when its parent exits, is adopted by this process (a
// child subreaper) so that Close can stop it.
func (c *Cluster) UpgradeAgentBySignal(host string) error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("become a subreaper: %w", err)
	}
	c.mu.Lock()
	old := c.agents[host]
	c.mu.Unlock()
	if old == nil {
		return fmt.Errorf("no agent running on %s", host)
	}
	if err := old.proc.Signal(syscall.SIGUSR2); err != nil {
		return err
	}
	select {
	case <-old.done:
	case <-time.After(60 * time.Second):
		return fmt.Errorf("the agent on %s did not hand over in 60 s; log:\n%s", host, c.tail(host))
	}
	// The orphan is adopted by now. A subreaper would also adopt every
	// daemon started later (nginx, keepalived) and, never reaping them,
	// keep their zombies, which kill(pid, 0) and keepalived's pid file
	// check take for live processes.
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	st, err := c.Admin(host, "status")
	if err != nil {
		return fmt.Errorf("no agent answers on %s after the upgrade: %w; log:\n%s", host, err, c.tail(host))
	}
	m := regexp.MustCompile(`pid=(\d+)`).FindStringSubmatch(st)
	if m == nil {
		return fmt.Errorf("status on %s names no pid: %q", host, st)
	}
	pid, _ := strconv.Atoi(m[1])
	proc, _ := os.FindProcess(pid)
	p := &agentProc{proc: proc, done: make(chan struct{})}
	go func() {
		// The orphan is this process's child now: Wait reaps it.
		st, err := proc.Wait()
		if err == nil && !st.Success() {
			err = fmt.Errorf("%v", st)
		}
		p.err = err
		close(p.done)
	}()
	c.mu.Lock()
	c.agents[host] = p
	c.mu.Unlock()
	return nil
}

// Notifications returns the systemd notifications host's agents sent
// (Options.Notify), one string per datagram.
func (c *Cluster) Notifications(host string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.notes[host]...)
}

func (c *Cluster) notifyPath(host string) string { return filepath.Join(c.Dir, host+".notify") }

// listenNotify receives the agents' systemd notifications, as systemd's
// NOTIFY_SOCKET would.
func (c *Cluster) listenNotify(hosts []string) error {
	c.notify = map[string]*net.UnixConn{}
	c.notes = map[string][]string{}
	for _, h := range hosts {
		conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: c.notifyPath(h), Net: "unixgram"})
		if err != nil {
			return fmt.Errorf("notify socket: %w", err)
		}
		c.notify[h] = conn
		go func() {
			buf := make([]byte, 4096)
			for {
				n, err := conn.Read(buf)
				if err != nil {
					return
				}
				c.mu.Lock()
				c.notes[h] = append(c.notes[h], string(buf[:n]))
				c.mu.Unlock()
			}
		}()
	}
	return nil
}

// UpgradeAgent starts a new agent on host beside the running one, as
// `tcpha-agent -upgrade` (force) or as a plain start after a SIGQUIT, and
// waits until the old one has handed over and exited and the new one
// answers.
func (c *Cluster) UpgradeAgent(host string, force bool) error {
	c.mu.Lock()
	old := c.agents[host]
	c.mu.Unlock()
	if old == nil {
		return fmt.Errorf("no agent running on %s", host)
	}
	var args []string
	if force {
		args = append(args, "-upgrade")
	}
	p, err := c.spawnAgent(host, args...)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.daemons = append(c.daemons, old) // so that Close stops it if it lingers
	c.mu.Unlock()
	if err := c.waitUp(host, p, old); err != nil {
		return err
	}
	if old.err != nil {
		return fmt.Errorf("the old agent on %s: %v; log:\n%s", host, old.err, c.tail(host))
	}
	return nil
}

type agentProc struct {
	proc *os.Process
	done chan struct{}
	err  error
}

func (c *Cluster) tail(host string) string {
	b, _ := os.ReadFile(c.AgentLog(host))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// Grep returns the lines of host's agent log that contain s (a client
// address, say), for a failing test to show.
func (c *Cluster) Grep(host, s string) string {
	b, _ := os.ReadFile(c.AgentLog(host))
	var out strings.Builder
	for l := range strings.Lines(string(b)) {
		if strings.Contains(l, s) {
			out.WriteString(host + ": " + l)
		}
	}
	return out.String()
}

// StopAgent sends sig to host's agent and waits up to 10 s for it to exit.
func (c *Cluster) StopAgent(host string, sig syscall.Signal) error {
	if err := c.StopAgentAsync(host, sig); err != nil {
		return err
	}
	return c.WaitAgent(host, 10*time.Second)
}

// StopAgentAsync sends sig to host's agent. `ip netns exec` execs the
// agent, so the pid is the agent's.
func (c *Cluster) StopAgentAsync(host string, sig syscall.Signal) error {
	c.mu.Lock()
	p := c.agents[host]
	c.mu.Unlock()
	if p == nil {
		return fmt.Errorf("no agent running on %s", host)
	}
	return p.proc.Signal(sig)
}

// WaitAgent waits up to d for host's agent to exit, then kills it.
func (c *Cluster) WaitAgent(host string, d time.Duration) error {
	c.mu.Lock()
	p := c.agents[host]
	delete(c.agents, host)
	c.mu.Unlock()
	if p == nil {
		return fmt.Errorf("no agent running on %s", host)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(d):
		p.proc.Kill()
		<-p.done
		return fmt.Errorf("agent on %s still running %v after it was told to stop", host, d)
	}
}

// AgentPID returns the process id of host's agent, or 0.
func (c *Cluster) AgentPID(host string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if p := c.agents[host]; p != nil {
		return p.proc.Pid
	}
	return 0
}

// StartDaemon starts a long-running command in host's namespace, with its
// output in DIR/name.log; Close stops it.
func (c *Cluster) StartDaemon(host, name string, args ...string) (*exec.Cmd, error) {
	logf, err := os.Create(filepath.Join(c.Dir, name+".log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command("ip", append([]string{"netns", "exec", c.NS(host)}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s on %s: %w", name, host, err)
	}
	p := &agentProc{proc: cmd.Process, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	c.mu.Lock()
	c.daemons = append(c.daemons, p)
	c.mu.Unlock()
	return cmd, nil
}

// Admin sends a command to host's agent admin socket.
func (c *Cluster) Admin(host, cmd string) (string, error) {
	out, err := admin.Do(c.AdminSocket(host), cmd, 5*time.Second)
	if err != nil {
		return "", fmt.Errorf("%s on %s: %w", cmd, host, err)
	}
	return out, nil
}

// Counter reads an interface statistic of host's eth0, e.g. "tx_bytes".
func (c *Cluster) Counter(host, name string) (uint64, error) {
	out, err := c.Output(context.Background(), host, "cat", "/sys/class/net/eth0/statistics/"+name)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(out), 10, 64)
}

// MAC returns host's eth0 hardware address.
func (c *Cluster) MAC(host string) (string, error) {
	out, err := c.Output(context.Background(), host, "cat", "/sys/class/net/eth0/address")
	return strings.TrimSpace(out), err
}

// Close stops agents and nginx and removes the namespaces and files.
func (c *Cluster) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	agents := c.agents
	c.agents = map[string]*agentProc{}
	nginx := c.nginx
	daemons := c.daemons
	for _, n := range c.notify {
		n.Close()
	}
	c.mu.Unlock()
	for _, d := range daemons {
		d.proc.Signal(syscall.SIGTERM)
	}
	for _, d := range daemons {
		select {
		case <-d.done:
		case <-time.After(5 * time.Second):
			d.proc.Kill()
			<-d.done
		}
	}
	for _, p := range agents {
		p.proc.Signal(syscall.SIGTERM)
	}
	for _, p := range agents {
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			p.proc.Kill()
			<-p.done
		}
	}
	for _, pf := range nginx {
		if b, err := os.ReadFile(pf); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(pid, syscall.SIGTERM)
			}
		}
	}
	var errs []error
	for _, h := range append(c.hosts(), "sw") {
		if err := run("ip", "netns", "del", c.NS(h)); err != nil && !strings.Contains(err.Error(), "No such file") {
			errs = append(errs, err)
		}
	}
	if os.Getenv("TCPHA_KEEP") == "" {
		os.RemoveAll(c.Dir)
	}
	return errors.Join(errs...)
}

// Dial opens a TCP connection from host's namespace to remote, from local
// port localPort (0: any) with SO_REUSEADDR, so a test can reuse a client
// port deterministically. The socket is created on a thread switched into
// the namespace; it stays there after the thread switches back.
func (c *Cluster) Dial(ctx context.Context, host string, localPort int, remote string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread is left locked and so discarded when the goroutine
		// ends, in case switching back failed.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ch <- result{nil, err}
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(c.NS(host))
		if err != nil {
			ch <- result{nil, fmt.Errorf("namespace of %s: %w", host, err)}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			ch <- result{nil, fmt.Errorf("enter namespace of %s: %w", host, err)}
			return
		}
		d := net.Dialer{
			LocalAddr: &net.TCPAddr{Port: localPort},
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				rc.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
				})
				return serr
			},
		}
		conn, err := d.DialContext(ctx, "tcp4", remote)
		if serr := netns.Set(orig); serr == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{conn, err}
	}()
	r := <-ch
	return r.c, r.err
}
