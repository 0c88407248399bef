package config

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/ini.v1"

	"tcpha/backends"
)

// Load reads and parses the config file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(path, data)
}

// allowed lists, per section, every key the agent understands and whether it
// may be repeated. Anything else is rejected: ini.v1 never reports unknown keys
// on its own (FACTS.md).
var allowed = map[string]map[string]bool{
	"global": {"loglevel": false, "logfile": false, "accesslog": false, "admin": false, "secret": false, "metrics": false, "pprof": false, "handoverwait": false},
	"fe": {
		"raddr": false, "vaddr": false, "port": false, "startservers": false,
		"maxspareservers": false, "minspareservers": false, "maxclients": false,
		"connperbe": false, "redirectaddr": false, "redirectport": false,
		"server": true, "rule": true,
		"requesttimeout": false, "maxheader": false, "handofftimeout": false, "maxconnperip": false,
		"timewait": false, "idletimeout": false, "dtcinterval": false,
		"queuenum": false, "drain": false,
		"scheduler": false, "rise": false, "fall": false, "feport": false, "phttp": false, "syncpeer": false,
		"dregister": false, "tlsport": false, "vip": false, "accept": false, "pintimeout": false,
		"check": false, "checkexpect": false,
	},
	"be": {
		"raddr": false, "uaddr": false, "vaddr": false, "port": false,
		"startservers": false, "maxspareservers": false, "minspareservers": false,
		"maxclients": false, "redirectaddr": false, "redirectport": false,
		"dregister": false, "feaddr": false, "feport": false, "rule": true,
		"committimeout": false, "drain": false, "keepalivetimeout": false,
		"requesttimeout": false, "maxheader": false, "forwardedfor": false,
		"redirecttlsport": false, "proxyprotocol": false, "maxconnperip": false, "deliver": false, "clientaddr": false,
		"queuenum": false, "check": false, "checkexpect": false,
	},
}

// sectionOf names the sections a key belongs in, for a key given in the
// wrong one ("" if none).
func sectionOf(key string) string {
	var in []string
	for _, sn := range []string{"global", "fe", "be"} {
		if _, ok := allowed[sn][key]; ok {
			in = append(in, sn)
		}
	}
	return strings.Join(in, "] or [")
}

// SampleSecret is the placeholder secret of the shipped samples (etc/,
// README): a config that keeps it is refused, so that no cluster runs with
// a secret everyone knows.
const SampleSecret = "change-me-to-a-long-random-string"

// MinSecret is the shortest secret accepted, in bytes.
const MinSecret = 16

// Parse parses config text; name is used in error messages. What is legal
// but probably a mistake goes to Config.Warnings.
func Parse(name string, data []byte) (*Config, error) {
	// An editor's UTF-8 byte-order mark is not part of the first line
	// (it made "[global]" a line without "=").
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	lines, err := indexLines(name, data)
	if err != nil {
		return nil, err
	}
	// ini.v1's defaults lose data for this file format (FACTS.md): keep
	// repeated server/rule lines, even identical ones, and do not cut values
	// at '#' or ';', which regular expressions contain.
	f, err := ini.LoadSources(ini.LoadOptions{
		AllowShadows:               true,
		AllowDuplicateShadowValues: true,
		IgnoreInlineComment:        true,
		SpaceBeforeInlineComment:   false,
		// A regexp may end in a backslash; ini.v1 would join the next
		// line to it (`rule = ... \.jpg\` swallowed the catch-all rule).
		IgnoreContinuation: true,
	}, data)
	if err != nil {
		return nil, &Error{File: name, Msg: fmt.Sprintf("not an ini file: %v", err)}
	}
	p := &parser{file: name, lines: lines}
	cfg := &Config{File: name}
	defer func() { cfg.Warnings = p.warnings }()
	for _, s := range f.Sections() {
		sn := s.Name()
		if sn == ini.DefaultSection {
			if len(s.Keys()) > 0 {
				k := s.Keys()[0].Name()
				return nil, &Error{File: name, Line: lines.line("", k, 0), Key: k, Section: "(none)",
					Msg: "key outside any section; put it under [global], [fe] or [be]"}
			}
			continue
		}
		keys, ok := allowed[sn]
		if !ok {
			return nil, &Error{File: name, Line: lines.sectionLine(sn), Section: sn,
				Msg: "unknown section (want global, fe or be)"}
		}
		for _, k := range s.Keys() {
			repeat, ok := keys[k.Name()]
			if !ok {
				msg := "unknown key"
				if home := sectionOf(k.Name()); home != "" {
					msg += "; it belongs in [" + home + "]"
				}
				return nil, &Error{File: name, Line: lines.line(sn, k.Name(), 0), Section: sn, Key: k.Name(), Msg: msg}
			}
			if n := len(k.ValueWithShadows()); n > 1 && !repeat {
				return nil, &Error{File: name, Line: lines.line(sn, k.Name(), 1), Section: sn, Key: k.Name(),
					Msg: "given more than once"}
			}
		}
	}
	// A missing [global] is an empty one: every key takes its default.
	gs, err := f.GetSection("global")
	if err != nil {
		gs = ini.Empty().Section("global")
	}
	if cfg.Global, err = p.global(gs); err != nil {
		return nil, err
	}
	if s, err := f.GetSection("fe"); err == nil {
		if cfg.FE, err = p.fe(s); err != nil {
			return nil, err
		}
	}
	if s, err := f.GetSection("be"); err == nil {
		if cfg.BE, err = p.be(s); err != nil {
			return nil, err
		}
	}
	if cfg.FE == nil && cfg.BE == nil {
		return nil, &Error{File: name, Msg: "no [fe] or [be] section: nothing to run"}
	}
	if why := cfg.sessions(); why != "" && len(cfg.Global.Secret) == 0 {
		// Without it a BE trusts every connection from an feaddr host,
		// and so every local user of that host (issue 19: an
		// unprivileged process reset a live client's flow).
		return nil, &Error{File: name, Line: lines.sectionLine("global"), Section: "global", Key: "secret",
			Msg: "missing: " + why + ", and the secret authenticates them: " +
				"set the same `secret = ...` on every host of the cluster (e.g. the output of `openssl rand -hex 32`)"}
	}
	if cfg.FE != nil && cfg.BE != nil && cfg.FE.VAddr != cfg.BE.VAddr {
		return nil, &Error{File: name, Line: lines.line("be", "vaddr", 0), Section: "be", Key: "vaddr",
			Msg: fmt.Sprintf("differs from [fe] vaddr %s; one host serves one VIP", cfg.FE.VAddr)}
	}
	if cfg.FE != nil && cfg.BE != nil && cfg.BE.Deliver == DeliverSocket && cfg.FE.PHTTP == "forward" {
		// A delivered connection's later requests reach the web server;
		// the BE's packet path can hold one for another BE and move the
		// connection there (multi), but not fetch it from another BE's
		// web server (forward). A BE on another host learns phttp from the
		// FE's cluster frame and relays instead (reason phttp).
		return nil, &Error{File: name, Line: lines.line("be", "deliver", 0), Section: "be", Key: "deliver",
			Msg: "socket cannot work with [fe] phttp = forward: the web server, not the agent, reads a delivered connection's later requests, which can be moved to another BE (multi) but not fetched from one; set phttp = multi or single, or deliver = relay"}
	}
	if cfg.FE != nil && cfg.BE != nil && cfg.BE.Deliver == DeliverSocket && cfg.BE.QueueNum == cfg.FE.QueueNum {
		return nil, &Error{File: name, Line: lines.line("be", "queuenum", 0), Section: "be", Key: "queuenum",
			Msg: fmt.Sprintf("is [fe] queuenum %d: with deliver = socket each role reads a queue of its own", cfg.FE.QueueNum)}
	}
	if cfg.FE != nil && cfg.BE != nil && cfg.BE.UAddr == cfg.FE.RAddr {
		return nil, &Error{File: name, Line: lines.line("be", "uaddr", 0), Section: "be", Key: "uaddr",
			Msg: fmt.Sprintf("is [fe] raddr %s: uaddr must be an address the cluster does not use", cfg.FE.RAddr)}
	}
	return cfg, nil
}

// sessions says why this host opens or accepts control sessions, or "" if
// it does not: an FE without servers or registration hands nothing off.
func (c *Config) sessions() string {
	switch {
	case c.BE != nil:
		return "a BE takes control sessions from its FEs"
	case len(c.FE.Servers) > 0:
		return "an FE with servers opens control sessions to them"
	case c.FE.DRegister:
		return "an FE with dregister = 1 takes registrations from BEs"
	case c.FE.SyncPeer.IsValid():
		return "an FE with syncpeer streams its flows to the other FE"
	}
	return ""
}

func (p *parser) global(s *ini.Section) (Global, error) {
	v := section{p: p, s: s}
	g := Global{
		LogLevel: v.intIn("loglevel", 4, 0, 6),
		LogFile:  v.str("logfile", ""),
		Admin:    v.str("admin", "/run/tcpha/admin.sock"),
		// Long enough for an operator to start the new agent by hand.
		HandoverWait: v.duration("handoverwait", 30*time.Second, time.Second, false),
	}
	if sec := v.str("secret", ""); sec != "" {
		switch {
		case sec == SampleSecret:
			v.fail("secret", v.line("secret", 0), "is the sample's placeholder: replace it with a secret of your own, "+
				"the same on every host of the cluster (e.g. the output of `openssl rand -hex 32`)")
		case len(sec) < MinSecret:
			// The proofs and frame HMACs are only as strong as the
			// key: a short one is guessed offline from one captured
			// handshake.
			v.fail("secret", v.line("secret", 0), fmt.Sprintf("is %d bytes, want at least %d "+
				"(e.g. the output of `openssl rand -hex 32`)", len(sec), MinSecret))
		}
		g.Secret = []byte(sec)
	}
	g.AccessLog = v.str("accesslog", "")
	g.Metrics = v.listenAddr("metrics")
	g.Pprof = v.listenAddr("pprof")
	return g, v.err
}

func (p *parser) fe(s *ini.Section) (*FE, error) {
	v := section{p: p, s: s}
	fe := &FE{
		RAddr:           v.addr("raddr", false, netip.IPv4Unspecified()),
		VAddr:           v.addr("vaddr", true, netip.Addr{}),
		Port:            v.port("port", 80),
		StartServers:    v.intIn("startservers", 5, 1, 1<<16),
		MaxSpareServers: v.intIn("maxspareservers", 5, 0, 1<<16),
		MinSpareServers: v.intIn("minspareservers", 2, 0, 1<<16),
		MaxClients:      v.intIn("maxclients", 256, 1, 1<<20),
		ConnPerBE:       v.intIn("connperbe", 2, 1, 1024),
		RedirectAddr:    v.addr("redirectaddr", false, netip.IPv4Unspecified()),
		RedirectPort:    v.port("redirectport", 8080),
		RequestTimeout:  v.duration("requesttimeout", 10*time.Second, 100*time.Millisecond, false),
		MaxHeader:       v.intIn("maxheader", 8192, 256, 1<<20),
		MaxConnPerIP:    v.intIn("maxconnperip", 256, 0, 1<<20),
		HandoffTimeout:  v.duration("handofftimeout", 2*time.Second, 10*time.Millisecond, false),
		TimeWait:        v.duration("timewait", 10*time.Second, time.Second, false),
		IdleTimeout:     v.duration("idletimeout", 15*time.Minute, time.Second, false),
		DtcInterval:     v.duration("dtcinterval", 5*time.Second, 100*time.Millisecond, true),
		QueueNum:        uint16(v.intIn("queuenum", 0, 0, 65535)),
		Drain:           v.duration("drain", 20*time.Second, 0, true),
	}
	if fe.VAddr.IsValid() && fe.RAddr == fe.VAddr {
		v.fail("vaddr", v.line("vaddr", 0), "must differ from raddr: the VIP moves between FEs, raddr is this host's own")
	}
	// The seed's BE option, on the FE's side: take BEs' registrations on
	// raddr:feport. Off by default, so that no port is open for it.
	fe.DRegister = v.intIn("dregister", 0, 0, 1) == 1
	if fe.DRegister && fe.RAddr.IsUnspecified() {
		v.fail("dregister", v.line("dregister", 0), "needs [fe] raddr: BEs register on raddr:feport, never on the VIP")
	}
	// 0, the default, leaves TLS off: no second listener, no second port
	// in the FE's table.
	fe.TLSPort = uint16(v.intIn("tlsport", 0, 0, 65535))
	if fe.TLSPort != 0 && fe.TLSPort == fe.Port {
		v.fail("tlsport", v.line("tlsport", 0), fmt.Sprintf("%d is already the HTTP port", fe.TLSPort))
	}
	fe.VIP = VIPAgent
	if m, ok := v.raw("vip"); ok {
		switch o := VIPOwner(m); o {
		case VIPAgent, VIPKeepalived:
			fe.VIP = o
		default:
			v.fail("vip", v.line("vip", 0), fmt.Sprintf("%q: want agent or keepalived", m))
		}
	}
	fe.Accept = AcceptFE
	if m, ok := v.raw("accept"); ok {
		switch a := Accept(m); a {
		case AcceptFE, AcceptBE:
			fe.Accept = a
		default:
			v.fail("accept", v.line("accept", 0), fmt.Sprintf("%q: want fe or be", m))
		}
	}
	// A pinned flow that never sends a request holds its element this
	// long: it must cover the handshake and the request's arrival.
	fe.PinTimeout = v.duration("pintimeout", fe.RequestTimeout+time.Second, time.Second, false)
	if _, set := v.raw("pintimeout"); set && fe.PinTimeout > fe.IdleTimeout {
		v.fail("pintimeout", v.line("pintimeout", 0), fmt.Sprintf("%v is longer than idletimeout (%v): a flow that never asks would outlive an idle one", fe.PinTimeout, fe.IdleTimeout))
	}
	fe.Check = v.check(backends.DefaultCheck)
	fe.Rise = v.intIn("rise", 2, 1, 100)
	fe.Fall = v.intIn("fall", 3, 1, 100)
	fe.FEPort = v.port("feport", fe.Port)
	// The other FE: the sync session is dialed from raddr to
	// syncpeer:feport and accepted on raddr:feport.
	if fe.SyncPeer = v.addr("syncpeer", false, netip.Addr{}); fe.SyncPeer.IsValid() {
		switch {
		case fe.RAddr.IsUnspecified():
			v.fail("syncpeer", v.line("syncpeer", 0), "needs [fe] raddr: the FEs sync on raddr:feport, never on the VIP")
		case fe.SyncPeer == fe.RAddr:
			v.fail("syncpeer", v.line("syncpeer", 0), fmt.Sprintf("%v is this FE's own raddr: name the other FE's", fe.SyncPeer))
		case fe.SyncPeer == fe.VAddr:
			v.fail("syncpeer", v.line("syncpeer", 0), fmt.Sprintf("%v is the VIP: name the other FE's raddr", fe.SyncPeer))
		}
	}
	fe.PHTTP = "multi"
	if m, ok := v.raw("phttp"); ok {
		switch m {
		case "single", "forward", "multi":
			fe.PHTTP = m
		default:
			v.fail("phttp", v.line("phttp", 0), fmt.Sprintf("%q: want single, multi or forward", m))
		}
	}
	fe.Scheduler = backends.RoundRobin
	if s, ok := v.raw("scheduler"); ok {
		p, err := backends.ParsePolicy(s)
		if err != nil {
			v.fail("scheduler", v.line("scheduler", 0), err.Error())
		}
		fe.Scheduler = p
	}
	seen := map[netip.Addr]int{}
	for i, val := range v.all("server") {
		srv := v.server(val, i)
		if first, dup := seen[srv.Addr]; dup && srv.Addr.IsValid() {
			v.fail("server", v.line("server", i), fmt.Sprintf("%v is already declared on line %d", srv.Addr, first))
		}
		switch {
		case srv.Addr.IsValid() && srv.Addr == fe.VAddr:
			v.fail("server", v.line("server", i), fmt.Sprintf("%v is the VIP: a server is a BE's raddr", srv.Addr))
		case srv.Addr.IsValid() && srv.Addr == fe.RAddr:
			v.fail("server", v.line("server", i), fmt.Sprintf("%v is this FE's raddr: serve locally with `rule = local PATTERN`", srv.Addr))
		}
		seen[srv.Addr] = v.line("server", i)
		fe.Servers = append(fe.Servers, srv)
	}
	fe.Rules = v.rules("rule", fe.Servers, true)
	if v.err == nil && len(fe.Rules) == 0 {
		v.fail("rule", 0, "missing: at least one `rule = TARGET PATTERN` is needed (e.g. `rule = local .*`)")
	}
	if fe.Accept == AcceptBE {
		if fe.TLSPort != 0 {
			v.fail("accept", v.line("accept", 0), "accept = be does not take TLS yet: remove tlsport, or use accept = fe")
		}
		for i, r := range fe.Rules {
			if r.Local {
				v.fail("rule", v.line("rule", i), "`local` needs accept = fe: with accept = be the FE reads no request")
				break
			}
		}
	}
	if v.err == nil {
		v.ruleWarnings(fe)
	}
	return fe, v.err
}

func (p *parser) be(s *ini.Section) (*BE, error) {
	v := section{p: p, s: s}
	be := &BE{
		RAddr:           v.addr("raddr", true, netip.Addr{}),
		UAddr:           v.addr("uaddr", true, netip.Addr{}),
		VAddr:           v.addr("vaddr", true, netip.Addr{}),
		Port:            v.port("port", 666),
		StartServers:    v.intIn("startservers", 5, 1, 1<<16),
		MaxSpareServers: v.intIn("maxspareservers", 5, 0, 1<<16),
		MinSpareServers: v.intIn("minspareservers", 2, 0, 1<<16),
		MaxClients:      v.intIn("maxclients", 256, 1, 1<<20),
		RedirectAddr:    v.addr("redirectaddr", false, netip.IPv4Unspecified()),
		RedirectPort:    v.port("redirectport", 80),
		DRegister:       v.intIn("dregister", 0, 0, 1) == 1,
		ForwardedFor:    v.onOff("forwardedfor", false),
		RedirectTLSPort: v.port("redirecttlsport", 443),
		ProxyProtocol:   v.onOff("proxyprotocol", false),
		FEPort:          v.port("feport", 80),
		CommitTimeout:   v.duration("committimeout", 5*time.Second, 10*time.Millisecond, false),
		Drain:           v.duration("drain", 20*time.Second, 0, true),
		// nginx's keepalive_timeout default.
		KeepAliveTimeout: v.duration("keepalivetimeout", 75*time.Second, time.Second, false),
		RequestTimeout:   v.duration("requesttimeout", 10*time.Second, 100*time.Millisecond, false),
		MaxHeader:        v.intIn("maxheader", 8192, 256, 16<<10),
		MaxConnPerIP:     v.intIn("maxconnperip", 256, 0, 1<<20),
		// Only what is given: the rest is what each FE asks.
		Check: v.check(backends.Check{}),
	}
	be.Deliver = DeliverRelay
	if m, ok := v.raw("deliver"); ok {
		switch d := Deliver(m); d {
		case DeliverRelay, DeliverSocket:
			be.Deliver = d
		default:
			v.fail("deliver", v.line("deliver", 0), fmt.Sprintf("%q: want relay or socket", m))
		}
	}
	be.ClientAddr = v.onOff("clientaddr", true)
	// 1, not the FE's 0: one host may run both roles, and only one socket
	// per network namespace may bind a queue number.
	be.QueueNum = uint16(v.intIn("queuenum", 1, 0, 65535))
	// The seed needed feaddr only for dynamic registration; tcpha also
	// accepts control sessions only from its FEs, so it is always required.
	be.FEAddrs = v.addrList("feaddr", "the BE takes handoffs only from its FEs: set `feaddr = FE_RADDR`")
	be.Rules = v.rules("rule", nil, false)
	if be.DRegister && v.err == nil && len(be.Rules) == 0 {
		v.fail("rule", 0, "missing: dregister = 1 needs the BE's own `rule = ADDR PATTERN`")
	}
	if v.err == nil {
		switch {
		case be.UAddr == be.VAddr:
			v.fail("uaddr", v.line("uaddr", 0), "must differ from vaddr: it replaces the VIP in the BE's ARP")
		case be.UAddr == be.RAddr:
			v.fail("uaddr", v.line("uaddr", 0), "must differ from raddr: it must be an address the cluster does not use")
		case be.RAddr == be.VAddr:
			v.fail("raddr", v.line("raddr", 0), "must differ from vaddr")
		case slices.Contains(be.FEAddrs, be.VAddr):
			v.fail("feaddr", v.line("feaddr", 0), fmt.Sprintf("%v is the VIP: feaddr lists the FEs' raddr, from which they open control sessions", be.VAddr))
		case slices.Contains(be.FEAddrs, be.UAddr):
			v.fail("uaddr", v.line("uaddr", 0), fmt.Sprintf("%v is an FE's address (feaddr): uaddr must be an address the cluster does not use", be.UAddr))
		}
	}
	return be, v.err
}

// section reads typed values from one ini section, keeping the first error.
type section struct {
	p   *parser
	s   *ini.Section
	err error
}

type parser struct {
	file     string
	lines    lineIndex
	warnings []string
}

// warn records what is legal but probably not meant, placed like an Error.
func (v *section) warn(key string, line int, msg string) {
	e := &Error{File: v.p.file, Line: line, Section: v.s.Name(), Key: key, Msg: msg}
	v.p.warnings = append(v.p.warnings, e.Error())
}

func (v *section) line(key string, nth int) int { return v.p.lines.line(v.s.Name(), key, nth) }

func (v *section) fail(key string, line int, msg string) {
	if v.err == nil {
		v.err = &Error{File: v.p.file, Line: line, Section: v.s.Name(), Key: key, Msg: msg}
	}
}

func (v *section) raw(key string) (string, bool) {
	if !v.s.HasKey(key) {
		return "", false
	}
	return uncomment(v.s.Key(key).String()), true
}

func (v *section) all(key string) []string {
	if !v.s.HasKey(key) {
		return nil
	}
	vals := v.s.Key(key).ValueWithShadows()
	out := make([]string, len(vals))
	for i, s := range vals {
		out[i] = uncomment(s)
	}
	return out
}

// uncomment cuts a value at a comment: a '#' or ';' that follows a space or
// tab, as operators write them (`port = 80  # the VIP's`). A '#' or ';'
// inside a word stays: a regular expression may hold one, and a request
// path never holds a space or a '#'.
func uncomment(s string) string {
	for i := 1; i < len(s); i++ {
		if (s[i] == '#' || s[i] == ';') && (s[i-1] == ' ' || s[i-1] == '\t') {
			s = s[:i]
			break
		}
	}
	return strings.TrimSpace(s)
}

// check reads `check = METHOD PATH [host=H]` and `checkexpect = LIST`
// over def; a key not given keeps def's part.
func (v *section) check(def backends.Check) backends.Check {
	c := def
	if s, ok := v.raw("check"); ok {
		got, err := backends.ParseCheck(s)
		if err != nil {
			v.fail("check", v.line("check", 0), err.Error())
		}
		c.Method, c.Path, c.Host = got.Method, got.Path, got.Host
	}
	if s, ok := v.raw("checkexpect"); ok {
		e, err := backends.ParseExpect(s)
		if err != nil {
			v.fail("checkexpect", v.line("checkexpect", 0), err.Error())
		}
		c.Expect = e
	}
	return c
}

func (v *section) str(key, def string) string {
	if s, ok := v.raw(key); ok {
		return s
	}
	return def
}

func (v *section) addr(key string, required bool, def netip.Addr) netip.Addr {
	s, ok := v.raw(key)
	if !ok || s == "" {
		if required {
			v.fail(key, 0, "missing: this key must be given")
		}
		return def
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !a.Is4() {
		v.fail(key, v.line(key, 0), fmt.Sprintf("%q is not an IPv4 address", s))
		return def
	}
	return a
}

// listenAddr reads an optional IPv4 ADDR:PORT to listen on.
func (v *section) listenAddr(key string) string {
	s, ok := v.raw(key)
	if !ok || s == "" {
		return ""
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil || !ap.Addr().Is4() || ap.Port() == 0 {
		v.fail(key, v.line(key, 0), fmt.Sprintf("%q is not an IPv4 ADDR:PORT (e.g. 127.0.0.1:9180)", s))
		return ""
	}
	return ap.String()
}

// addrList reads a required list of IPv4 addresses, separated by spaces or
// commas.
func (v *section) addrList(key, why string) []netip.Addr {
	s, ok := v.raw(key)
	if !ok || s == "" {
		v.fail(key, 0, "missing: "+why)
		return nil
	}
	var out []netip.Addr
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ' ' || r == ',' || r == '\t' }) {
		a, err := netip.ParseAddr(f)
		if err != nil || !a.Is4() {
			v.fail(key, v.line(key, 0), fmt.Sprintf("%q is not an IPv4 address", f))
			return nil
		}
		out = append(out, a)
	}
	return out
}

func (v *section) port(key string, def uint16) uint16 {
	s, ok := v.raw(key)
	if !ok {
		return def
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		v.fail(key, v.line(key, 0), fmt.Sprintf("%q is not a port number (1-65535)", s))
		return def
	}
	return uint16(n)
}

func (v *section) intIn(key string, def, lo, hi int) int {
	s, ok := v.raw(key)
	if !ok {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		v.fail(key, v.line(key, 0), fmt.Sprintf("%q is not a whole number from %d to %d", s, lo, hi))
		return def
	}
	return n
}

// onOff accepts on/off, yes/no, true/false and 1/0.
func (v *section) onOff(key string, def bool) bool {
	s, ok := v.raw(key)
	if !ok {
		return def
	}
	switch strings.ToLower(s) {
	case "on", "yes", "true", "1":
		return true
	case "off", "no", "false", "0":
		return false
	}
	v.fail(key, v.line(key, 0), fmt.Sprintf("%q is not on or off", s))
	return def
}

// duration accepts whole seconds, as the seed's /proc knobs did, or a Go
// duration such as "1500ms", up to a year.
func (v *section) duration(key string, def, min time.Duration, zeroOK bool) time.Duration {
	s, ok := v.raw(key)
	if !ok {
		return def
	}
	d, err := ParseDuration(s)
	switch {
	case errors.Is(err, errTooLong):
		v.fail(key, v.line(key, 0), fmt.Sprintf("%q is longer than a year", s))
		return def
	case err != nil || d < 0 || (d == 0 && !zeroOK):
		v.fail(key, v.line(key, 0), fmt.Sprintf("%q is not a positive duration (seconds, or e.g. 500ms)", s))
		return def
	case d != 0 && d < min:
		// A value below the minimum is a slip (1ns for 1s), not a
		// tuning: tcpha.conf(5) gives each key's minimum and why.
		zero := ""
		if zeroOK {
			zero = " (or 0 to turn it off)"
		}
		v.fail(key, v.line(key, 0), fmt.Sprintf("%q is below the minimum of %v%s", s, min, zero))
		return def
	}
	return d
}

const maxDuration = 365 * 24 * time.Hour

var (
	errTooLong = errors.New("too long")
	// goDuration is the syntax of time.ParseDuration, which says "invalid"
	// for a value that overflows as for one that is not a duration.
	goDuration = regexp.MustCompile(`^([0-9]*(\.[0-9]*)?(ns|us|µs|ms|s|m|h))+$`)
)

// ParseDuration reads a duration as the config file writes one: whole
// seconds, or a Go duration such as 500ms, up to a year.
func ParseDuration(s string) (time.Duration, error) {
	if n, err := strconv.ParseInt(s, 10, 64); err == nil || errors.Is(err, strconv.ErrRange) {
		if err != nil || n > int64(maxDuration/time.Second) {
			return 0, errTooLong
		}
		return time.Duration(n) * time.Second, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		if goDuration.MatchString(s) {
			return 0, errTooLong
		}
		return 0, err
	}
	if d > maxDuration {
		return 0, errTooLong
	}
	return d, nil
}

func (v *section) server(val string, nth int) backends.Server {
	f := strings.Fields(val)
	line := v.line("server", nth)
	if len(f) != 2 && len(f) != 3 {
		v.fail("server", line, fmt.Sprintf("%q: want `server = ADDR PORT [weight=N]`", val))
		return backends.Server{}
	}
	a, err := netip.ParseAddr(f[0])
	if err != nil || !a.Is4() {
		v.fail("server", line, fmt.Sprintf("%q is not an IPv4 address", f[0]))
		return backends.Server{}
	}
	n, err := strconv.ParseUint(f[1], 10, 16)
	if err != nil || n == 0 {
		v.fail("server", line, fmt.Sprintf("%q is not a port number (1-65535)", f[1]))
		return backends.Server{}
	}
	srv := backends.Server{Addr: a, Port: uint16(n), Weight: 1}
	if len(f) == 3 {
		w, ok := strings.CutPrefix(f[2], "weight=")
		n, err := strconv.Atoi(w)
		if !ok || err != nil || n < 0 || n > backends.MaxWeight {
			v.fail("server", line, fmt.Sprintf("%q: want weight=N, N from 0 to %d", f[2], backends.MaxWeight))
			return backends.Server{}
		}
		srv.Weight = n
	}
	return srv
}

// rules parses `rule = TARGETS [scheduler=POLICY] [host=HOST] [PATTERN]`
// lines. TARGETS is one address, several separated by commas, or local;
// the options may come in either order; the pattern is the rest of the
// line after them, so it may contain spaces, '#' and ';' (though a '#' or
// ';' after a space starts a comment). A rule needs a host, a pattern or
// both. On the FE (fe true) every target must be a declared server or
// local.
func (v *section) rules(key string, servers []backends.Server, fe bool) []backends.Rule {
	var out []backends.Rule
	for i, val := range v.all(key) {
		line := v.line(key, i)
		val = strings.TrimSpace(val)
		targets, pat, ok := strings.Cut(val, " ")
		pat = strings.TrimSpace(pat)
		r := backends.Rule{Line: line}
		for fe {
			opt, rest, _ := strings.Cut(pat, " ")
			name, arg, isOpt := strings.Cut(opt, "=")
			if !isOpt || (name != "scheduler" && name != "host") {
				break
			}
			switch {
			case name == "scheduler" && r.Policy == "":
				policy, err := backends.ParsePolicy(arg)
				if err != nil {
					v.fail(key, line, err.Error())
					return nil
				}
				r.Policy = policy
			case name == "host" && r.Host == nil:
				if q := quoted(arg); q != "" {
					v.fail(key, line, fmt.Sprintf("host pattern %s is in quotes, which would be matched literally: write host=%s", arg, q))
					return nil
				}
				h, err := backends.CompileHost(arg)
				if err != nil {
					v.fail(key, line, fmt.Sprintf("bad host pattern %q: %v", arg, err))
					return nil
				}
				r.Host = h
			default:
				v.fail(key, line, fmt.Sprintf("%s= given twice", name))
				return nil
			}
			pat = strings.TrimSpace(rest)
		}
		if !fe && strings.HasPrefix(pat, "host=") {
			v.fail(key, line, "host= is for the FE's rules; a BE's own rule matches paths only")
			return nil
		}
		if !ok || (pat == "" && r.Host == nil) {
			v.fail(key, line, fmt.Sprintf("%q: want `rule = TARGET [host=HOST] PATTERN`", val))
			return nil
		}
		if q := quoted(pat); q != "" {
			// ini.v1 strips quotes only around a whole value; these
			// stayed part of the pattern, and a request path never
			// holds a '"' (RFC 3986 section 2), so the rule never matched.
			v.fail(key, line, fmt.Sprintf("pattern %s is in quotes, which would be matched literally: write it without them (%s)", pat, q))
			return nil
		}
		if pat != "" {
			re, err := regexp.Compile(pat)
			if err != nil {
				v.fail(key, line, fmt.Sprintf("bad regular expression %q: %v", pat, err))
				return nil
			}
			r.Pattern = re
		}
		if targets == "local" && fe {
			r.Local = true
			out = append(out, r)
			continue
		}
		for _, t := range strings.Split(targets, ",") {
			a, err := netip.ParseAddr(t)
			if err != nil || !a.Is4() {
				want := "an IPv4 address"
				if fe {
					want = "an IPv4 address, a list of them separated by commas, or local"
				}
				v.fail(key, line, fmt.Sprintf("target %q is not %s", t, want))
				return nil
			}
			if fe && !hasServer(servers, a) {
				v.fail(key, line, fmt.Sprintf("target %s is not declared by any `server =` line", a))
				return nil
			}
			if slices.Contains(r.Targets, a) {
				v.fail(key, line, fmt.Sprintf("target %s is named twice", a))
				return nil
			}
			r.Targets = append(r.Targets, a)
		}
		if !fe && len(r.Targets) != 1 {
			v.fail(key, line, fmt.Sprintf("%q: a BE's rule names one address, its own", targets))
			return nil
		}
		out = append(out, r)
	}
	return out
}

// quoted returns s without its surrounding double quotes if it has them,
// else "".
func quoted(s string) string {
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
		return s[1 : len(s)-1]
	}
	return ""
}

// ruleWarnings warns of FE rules that are legal but cannot do what they
// seem to: a rule whose only targets have weight 0, rules after a
// catch-all, and no catch-all at all.
func (v *section) ruleWarnings(fe *FE) {
	weight := map[netip.Addr]int{}
	for _, s := range fe.Servers {
		weight[s.Addr] = s.Weight
	}
	for _, r := range fe.Rules {
		if r.Local || len(r.Targets) == 0 {
			continue
		}
		if !slices.ContainsFunc(r.Targets, func(a netip.Addr) bool { return weight[a] > 0 }) {
			v.warn("rule", r.Line, fmt.Sprintf("every target (%s) has weight 0: the rule takes no request until one's weight is raised (tcphactl weight)", r.TargetString()))
		}
	}
	catchAll := -1 // the first rule taking every request
	for i, r := range fe.Rules {
		for _, e := range fe.Rules[:i] {
			if !covers(e, r) {
				continue
			}
			what := "only when every BE of that rule is unavailable, drained or of weight 0"
			if e.Local {
				what = "never: a local rule always takes the request"
			}
			v.warn("rule", r.Line, fmt.Sprintf("shadowed by the rule on line %d, which matches every request this one does: it takes requests %s", e.Line, what))
			break
		}
		if catchAll < 0 && r.Host == nil && matchesEveryPath(r.Pattern) {
			catchAll = i
		}
	}
	if catchAll < 0 {
		v.warn("rule", v.line("rule", len(fe.Rules)-1), "no catch-all rule (such as `rule = local .*` last): "+
			"an HTTP request that matches no rule is answered 503")
	}
}

// covers tells whether rule e matches every request rule r matches: e has
// no host= or the same one as r, and a path pattern that matches every
// path. A path rule with host= covers nothing of other hosts, and a
// host-only rule is no catch-all for other hosts.
func covers(e, r backends.Rule) bool {
	if e.Host != nil && (r.Host == nil || e.Host.String() != r.Host.String()) {
		return false
	}
	return matchesEveryPath(e.Pattern)
}

// everyPath are paths unlike each other; a pattern that matches them all
// is taken to match every path (`.*`, `^/`, `/`, `.`, `^.*$`). It decides
// only warnings.
var everyPath = []string{"/", "/a", "/Index.HTML", "/a/b/c.jpg", "/x.php?q=1&r=%20", "/~u/" + strings.Repeat("z", 300)}

func matchesEveryPath(re *regexp.Regexp) bool {
	if re == nil {
		return true
	}
	for _, p := range everyPath {
		if !re.MatchString(p) {
			return false
		}
	}
	return true
}

func hasServer(servers []backends.Server, a netip.Addr) bool {
	for _, s := range servers {
		if s.Addr == a {
			return true
		}
	}
	return false
}

// lineIndex remembers on which line each (section, key, occurrence) stands,
// because ini.v1 keeps no line numbers.
type lineIndex struct {
	keys     map[string][]int
	sections map[string]int
}

func (l lineIndex) line(section, key string, nth int) int {
	ls := l.keys[section+"\x00"+key]
	if nth < len(ls) {
		return ls[nth]
	}
	return 0
}

func (l lineIndex) sectionLine(section string) int { return l.sections[section] }

func indexLines(name string, data []byte) (lineIndex, error) {
	l := lineIndex{keys: map[string][]int{}, sections: map[string]int{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	section := ""
	for n := 1; sc.Scan(); n++ {
		t := strings.TrimSpace(sc.Text())
		switch {
		case t == "" || t[0] == '#' || t[0] == ';':
		case t[0] == '[':
			if !strings.HasSuffix(t, "]") {
				return l, &Error{File: name, Line: n, Msg: fmt.Sprintf("%q: unterminated section header", t)}
			}
			section = strings.TrimSpace(t[1 : len(t)-1])
			if _, dup := l.sections[section]; dup {
				return l, &Error{File: name, Line: n, Section: section, Msg: "section given more than once"}
			}
			l.sections[section] = n
		default:
			k, _, ok := strings.Cut(t, "=")
			if f := strings.Fields(t); !ok && (f[0] == "include" || f[0] == "!include") {
				return l, &Error{File: name, Line: n, Section: section, Msg: "includes are not supported: put everything in this file"}
			}
			if !ok {
				return l, &Error{File: name, Line: n, Section: section, Msg: fmt.Sprintf("%q: want `key = value`", t)}
			}
			k = strings.TrimSpace(k)
			l.keys[section+"\x00"+k] = append(l.keys[section+"\x00"+k], n)
		}
	}
	return l, sc.Err()
}
