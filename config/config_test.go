package config

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tcpha/backends"
)

const goodFE = `[global]
loglevel = 5
admin = /tmp/tcpha-fe.sock
secret = s3cret;#x-long-enough

[fe]
raddr = 10.0.0.2
vaddr = 10.0.0.100
port = 80
server = 10.0.0.11 666
server = 10.0.0.12 666
# regexps may hold '#' and ';' and spaces
rule = 10.0.0.12 \.(jpg|png)$
rule = 10.0.0.11 ^/a;b#c d
rule = 10.0.0.11 .*
rule = local ^/status
`

func TestAccessLog(t *testing.T) {
	c, err := Parse("fe.conf", []byte(strings.Replace(goodFE, "[global]\n", "[global]\naccesslog = /var/log/tcpha/access.log\n", 1)))
	if err != nil || c.Global.AccessLog != "/var/log/tcpha/access.log" {
		t.Fatalf("accesslog: %v %+v", err, c)
	}
}

func TestParseFE(t *testing.T) {
	c, err := Parse("fe.conf", []byte(goodFE))
	if err != nil {
		t.Fatal(err)
	}
	fe := c.FE
	if fe == nil || c.BE != nil {
		t.Fatalf("roles: fe=%v be=%v", fe, c.BE)
	}
	if fe.VAddr != netip.MustParseAddr("10.0.0.100") || fe.Port != 80 {
		t.Errorf("vaddr/port = %v/%d", fe.VAddr, fe.Port)
	}
	if fe.TLSPort != 0 {
		t.Errorf("tlsport = %d by default, want 0 (off)", fe.TLSPort)
	}
	if len(fe.Servers) != 2 || fe.Servers[1].AddrPort().String() != "10.0.0.12:666" {
		t.Errorf("servers = %v", fe.Servers)
	}
	if len(fe.Rules) != 4 {
		t.Fatalf("rules = %d, want 4", len(fe.Rules))
	}
	if got := fe.Rules[1].Pattern.String(); got != "^/a;b#c d" {
		t.Errorf("rule 2 pattern = %q: inline comment characters were cut", got)
	}
	if fe.Rules[1].Line != 14 {
		t.Errorf("rule 2 line = %d, want 14", fe.Rules[1].Line)
	}
	if !fe.Rules[3].Local || fe.Rules[3].TargetString() != "local" {
		t.Errorf("rule 4 = %+v, want local", fe.Rules[3])
	}
	// Seed defaults (README "More details").
	if fe.MaxClients != 256 || fe.ConnPerBE != 2 || fe.RedirectPort != 8080 || fe.StartServers != 5 {
		t.Errorf("defaults: maxclients=%d connperbe=%d redirectport=%d startservers=%d",
			fe.MaxClients, fe.ConnPerBE, fe.RedirectPort, fe.StartServers)
	}
	if fe.Accept != AcceptFE || fe.PinTimeout != fe.RequestTimeout+time.Second {
		t.Errorf("defaults: accept=%s pintimeout=%v", fe.Accept, fe.PinTimeout)
	}
	if fe.QueueNum != 0 || fe.Drain != 20*time.Second || fe.TimeWait != 10*time.Second || fe.PHTTP != "multi" {
		t.Errorf("defaults: queuenum=%d drain=%v timewait=%v phttp=%s", fe.QueueNum, fe.Drain, fe.TimeWait, fe.PHTTP)
	}
	for _, m := range []string{"single", "multi", "forward"} {
		c, err := Parse("fe.conf", []byte(goodFE+"phttp = "+m+"\n"))
		if err != nil || c.FE.PHTTP != m {
			t.Errorf("phttp = %s: %v", m, err)
		}
	}
	if fe.VIP != VIPAgent {
		t.Errorf("vip = %q by default, want agent (the agent adds the VIP)", fe.VIP)
	}
	for _, o := range []VIPOwner{VIPAgent, VIPKeepalived} {
		c, err := Parse("fe.conf", []byte(goodFE+"vip = "+string(o)+"\n"))
		if err != nil || c.FE.VIP != o {
			t.Errorf("vip = %s: %v", o, err)
		}
	}
	if fe.SyncPeer.IsValid() {
		t.Errorf("syncpeer = %v by default, want none", fe.SyncPeer)
	}
	if c, err := Parse("fe.conf", []byte(goodFE+"syncpeer = 10.0.0.3\n")); err != nil || c.FE.SyncPeer.String() != "10.0.0.3" {
		t.Errorf("syncpeer = 10.0.0.3: %v", err)
	}
	if fe.Redirect().String() != "127.0.0.1:8080" {
		t.Errorf("redirect = %v, want loopback", fe.Redirect())
	}
	if string(c.Global.Secret) != "s3cret;#x-long-enough" || c.Global.LogLevel != 5 {
		t.Errorf("global = %+v", c.Global)
	}
}

// A host that opens or accepts control sessions needs the secret; an FE
// that hands nothing off does not. The FE opens its registration port only
// when asked to.
func TestSecretAndRegistration(t *testing.T) {
	local := "[fe]\nraddr = 10.0.0.2\nvaddr = 10.0.0.100\nrule = local .*\n"
	c, err := Parse("local.conf", []byte(local))
	if err != nil {
		t.Fatalf("an FE without servers needs no secret: %v", err)
	}
	if c.FE.DRegister {
		t.Error("dregister is on by default")
	}
	c, err = Parse("reg.conf", []byte("[global]\nsecret = test-secret-16byte\n"+local+"dregister = 1\n"))
	if err != nil || !c.FE.DRegister {
		t.Fatalf("dregister = 1: %v", err)
	}
	if c, err = Parse("fe.conf", []byte(goodFE)); err != nil || c.FE.DRegister {
		t.Errorf("goodFE: dregister %v, %v", c != nil && c.FE.DRegister, err)
	}
}

func TestParseDuplicateRulesKept(t *testing.T) {
	c, err := Parse("x", []byte("[global]\nsecret=test-secret-16byte\n[fe]\nvaddr=10.0.0.1\nserver=10.0.0.2 666\nrule=10.0.0.2 .*\nrule=10.0.0.2 .*\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.FE.Rules) != 2 {
		t.Errorf("identical rules collapsed: got %d, want 2", len(c.FE.Rules))
	}
}

func TestParseBE(t *testing.T) {
	c, err := Parse("be.conf", []byte(`[global]
secret = test-secret-16byte
[be]
raddr = 10.0.0.11
uaddr = 10.0.0.250
vaddr = 10.0.0.100
feaddr = 10.0.0.2, 10.0.0.3
redirectport = 8081
committimeout = 1500ms
`))
	if err != nil {
		t.Fatal(err)
	}
	be := c.BE
	if be.Port != 666 || be.Redirect().String() != "127.0.0.1:8081" || be.CommitTimeout != 1500*time.Millisecond {
		t.Errorf("be = %+v", be)
	}
	if len(be.FEAddrs) != 2 || be.FEAddrs[1].String() != "10.0.0.3" {
		t.Errorf("feaddr list: %v", be.FEAddrs)
	}
	if be.DRegister || be.FEPort != 80 {
		t.Errorf("dregister defaults: %+v", be)
	}
	if be.RedirectTLS().String() != "127.0.0.1:443" || be.ProxyProtocol {
		t.Errorf("TLS defaults: redirect %v, proxyprotocol %v", be.RedirectTLS(), be.ProxyProtocol)
	}
	if c.Global.Admin == "" || c.Global.LogLevel != 4 || c.Global.AccessLog != "" {
		t.Errorf("global defaults = %+v", c.Global)
	}
}

// [be] deliver: relay unless set; socket beside an FE with phttp =
// single or multi, not forward (TestParseErrors has the refusals).
func TestDeliver(t *testing.T) {
	be := "[global]\nsecret = test-secret-16byte\n[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\n"
	fe := "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.11 .*\n"
	for _, c := range []struct {
		text string
		want Deliver
	}{
		{be, DeliverRelay},
		{be + "deliver = relay\n", DeliverRelay},
		{be + "deliver = socket\n", DeliverSocket},
		{be + "deliver = socket\n" + fe + "phttp = single\n", DeliverSocket},
		{be + "deliver = socket\n" + fe + "phttp = multi\n", DeliverSocket},
		{be + "deliver = socket\n" + fe, DeliverSocket}, // multi by default
		{be + "deliver = relay\n" + fe, DeliverRelay},
	} {
		cfg, err := Parse("be.conf", []byte(c.text))
		if err != nil {
			t.Errorf("%q: %v", c.text, err)
			continue
		}
		if cfg.BE.Deliver != c.want || !cfg.BE.ClientAddr {
			t.Errorf("%q: deliver %q clientaddr %v, want %q and on", c.text, cfg.BE.Deliver, cfg.BE.ClientAddr, c.want)
		}
	}
	cfg, err := Parse("be.conf", []byte(be+"deliver = socket\nclientaddr = off\n"))
	if err != nil || cfg.BE.ClientAddr {
		t.Errorf("clientaddr = off: %v", err)
	}
	// The BE's queue: 1 unless set, apart from the FE's default 0.
	if cfg.BE.QueueNum != 1 {
		t.Errorf("[be] queuenum %d by default, want 1", cfg.BE.QueueNum)
	}
	if cfg, err := Parse("be.conf", []byte(be+"deliver = socket\nqueuenum = 7\n")); err != nil || cfg.BE.QueueNum != 7 {
		t.Errorf("queuenum = 7: %v", err)
	}
}

// Each kind of bad input is refused with the file, line, section and key.
func TestParseErrors(t *testing.T) {
	fe := "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\n"
	be := "[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\n"
	cases := []struct {
		name, text    string
		line          int
		section, key  string
		msgContaining string
	}{
		{"unknown key", fe + "rule = 10.0.0.11 .*\nbogus = 1\n", 5, "fe", "bogus", "unknown key"},
		{"unknown section", "[fee]\nvaddr=1.2.3.4\n", 1, "fee", "", "unknown section"},
		{"key outside section", "vaddr = 1.2.3.4\n" + fe, 1, "(none)", "vaddr", "outside any section"},
		{"bad address", "[fe]\nvaddr = 10.0.0.300\n", 2, "fe", "vaddr", "not an IPv4 address"},
		{"ipv6 address", "[fe]\nvaddr = ::1\n", 2, "fe", "vaddr", "not an IPv4 address"},
		{"missing vaddr", "[fe]\nport = 80\nrule = local .*\n", 0, "fe", "vaddr", "missing"},
		{"missing uaddr", "[be]\nraddr = 10.0.0.11\nvaddr = 10.0.0.100\n", 0, "be", "uaddr", "missing"},
		{"bad port", fe + "port = 70000\nrule = local .*\n", 4, "fe", "port", "not a port"},
		{"bad integer", fe + "maxclients = lots\nrule = local .*\n", 4, "fe", "maxclients", "whole number"},
		{"integer out of range", be + "dregister = 2\n", 6, "be", "dregister", "whole number from 0 to 1"},
		{"bad duration", fe + "requesttimeout = soon\nrule = local .*\n", 4, "fe", "requesttimeout", "duration"},
		{"bad regexp", fe + "rule = 10.0.0.11 (unclosed\n", 4, "fe", "rule", "bad regular expression"},
		{"rule without pattern", fe + "rule = 10.0.0.11\n", 4, "fe", "rule", "want `rule = TARGET [host=HOST] PATTERN`"},
		{"bad host pattern", fe + "rule = 10.0.0.11 host=(img .*\n", 4, "fe", "rule", "bad host pattern \"(img\""},
		{"empty host pattern", fe + "rule = 10.0.0.11 host= .*\n", 4, "fe", "rule", "bad host pattern"},
		{"host given twice", fe + "rule = 10.0.0.11 host=a host=b\n", 4, "fe", "rule", "host= given twice"},
		{"BE rule with host", be + "dregister = 1\nrule = 10.0.0.11 host=a .*\n", 7, "be", "rule", "host= is for the FE's rules"},
		{"rule names undeclared server", fe + "rule = 10.0.0.99 .*\n", 4, "fe", "rule", "not declared"},
		{"rule target not an address", fe + "rule = be1 .*\n", 4, "fe", "rule", "not an IPv4 address, a list of them"},
		{"rule list names undeclared server", fe + "rule = 10.0.0.11,10.0.0.12 .*\n", 4, "fe", "rule", "10.0.0.12 is not declared"},
		{"rule names a target twice", fe + "rule = 10.0.0.11,10.0.0.11 .*\n", 4, "fe", "rule", "named twice"},
		{"unknown rule scheduler", fe + "rule = 10.0.0.11 scheduler=fifo .*\n", 4, "fe", "rule", "unknown scheduler \"fifo\""},
		{"unknown scheduler", fe + "scheduler = fastest\nrule = local .*\n", 4, "fe", "scheduler", "want rr, wlc or lard"},
		{"syncpeer not an address", fe + "syncpeer = fe2\nrule = local .*\n", 4, "fe", "syncpeer", "not an IPv4 address"},
		{"syncpeer without raddr", fe + "syncpeer = 10.0.0.3\nrule = local .*\n", 4, "fe", "syncpeer", "needs [fe] raddr"},
		{"syncpeer is raddr", fe + "raddr = 10.0.0.2\nsyncpeer = 10.0.0.2\nrule = local .*\n", 5, "fe", "syncpeer", "this FE's own raddr"},
		{"syncpeer is the VIP", fe + "raddr = 10.0.0.2\nsyncpeer = 10.0.0.100\nrule = local .*\n", 5, "fe", "syncpeer", "is the VIP"},
		{"unknown vip owner", fe + "vip = vrrp\nrule = local .*\n", 4, "fe", "vip", "want agent or keepalived"},
		{"vip owner in [be]", be + "vip = keepalived\n", 6, "be", "vip", "it belongs in [fe]"},
		{"unknown accept", fe + "accept = both\nrule = local .*\n", 4, "fe", "accept", "want fe or be"},
		{"accept = be with tlsport", fe + "tlsport = 443\naccept = be\nrule = 10.0.0.11 .*\n", 5, "fe", "accept", "does not take TLS yet"},
		{"accept = be with a local rule", fe + "accept = be\nrule = local .*\n", 5, "fe", "rule", "`local` needs accept = fe"},
		{"accept in [be]", be + "accept = be\n", 6, "be", "accept", "it belongs in [fe]"},
		{"pintimeout past idletimeout", fe + "idletimeout = 30\npintimeout = 60\nrule = local .*\n", 5, "fe", "pintimeout", "longer than idletimeout"},
		{"unknown phttp", fe + "phttp = always\nrule = local .*\n", 4, "fe", "phttp", "want single, multi or forward"},
		{"unknown deliver", be + "deliver = splice\n", 6, "be", "deliver", "\"splice\": want relay or socket"},
		{"bad clientaddr", be + "clientaddr = client\n", 6, "be", "clientaddr", "on"},
		{"deliver socket with phttp forward", "[global]\nsecret = test-secret-16byte\n" + fe + "rule = 10.0.0.11 .*\nphttp = forward\n" + be + "deliver = socket\n",
			13, "be", "deliver", "socket cannot work with [fe] phttp = forward"},
		{"deliver socket on the FE's queue", "[global]\nsecret = test-secret-16byte\n" + fe + "rule = 10.0.0.11 .*\nphttp = single\nqueuenum = 1\n" + be + "deliver = socket\n",
			0, "be", "queuenum", "is [fe] queuenum 1"},
		{"bad BE queuenum", be + "queuenum = 70000\n", 6, "be", "queuenum", "whole number"},
		{"duplicate server", fe + "server = 10.0.0.11 667\nrule = local .*\n", 4, "fe", "server", "already declared on line 3"},
		{"bad weight", fe + "server = 10.0.0.12 666 weight=x\nrule = local .*\n", 4, "fe", "server", "weight=N"},
		{"weight too large", fe + "server = 10.0.0.12 666 weight=20000\nrule = local .*\n", 4, "fe", "server", "0 to 10000"},
		{"overflowing seconds", fe + "timewait = 99999999999999999999\nrule = local .*\n", 4, "fe", "timewait", "longer than a year"},
		{"overflowing go duration", fe + "timewait = 9999999999h\nrule = local .*\n", 4, "fe", "timewait", "longer than a year"},
		{"seconds past a year", fe + "idletimeout = 40000000\nrule = local .*\n", 4, "fe", "idletimeout", "longer than a year"},
		{"BE rule names a list", be + "rule = 10.0.0.11,10.0.0.12 .*\n", 6, "be", "rule", "one address"},
		{"BE without secret", be, 0, "global", "secret", "missing: a BE takes control sessions"},
		{"BE without secret, other globals", "[global]\nloglevel = 3\n" + be, 1, "global", "secret", "openssl rand"},
		{"registering BE without secret", be + "dregister = 1\nrule = 10.0.0.11 .*\n", 0, "global", "secret", "missing"},
		{"FE with servers without secret", fe + "rule = 10.0.0.11 .*\n", 0, "global", "secret", "an FE with servers opens control sessions"},
		{"registering FE without secret", "[fe]\nraddr = 10.0.0.2\nvaddr = 10.0.0.100\ndregister = 1\nrule = local .*\n", 0, "global", "secret", "dregister = 1 takes registrations"},
		{"syncing FE without secret", "[fe]\nraddr = 10.0.0.2\nvaddr = 10.0.0.100\nsyncpeer = 10.0.0.3\nrule = local .*\n", 0, "global", "secret", "syncpeer streams its flows"},
		{"registering FE without raddr", "[global]\nsecret = test-secret-16byte\n[fe]\nvaddr = 10.0.0.100\ndregister = 1\nrule = local .*\n", 5, "fe", "dregister", "needs [fe] raddr"},
		{"no rules", fe, 0, "fe", "rule", "at least one"},
		{"bad server", "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11\n", 3, "fe", "server", "ADDR PORT"},
		{"bad server port", "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 0\n", 3, "fe", "server", "not a port"},
		{"repeated single key", fe + "port = 80\nport = 81\nrule = local .*\n", 5, "fe", "port", "more than once"},
		{"no feaddr", "[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\n", 0, "be", "feaddr", "takes handoffs only from its FEs"},
		{"bad feaddr", "[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2 x\n", 5, "be", "feaddr", "\"x\" is not an IPv4 address"},
		{"dregister without rule", be + "dregister = 1\n", 0, "be", "rule", "dregister = 1"},
		{"uaddr equals vaddr", "[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.100\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\n", 3, "be", "uaddr", "must differ"},
		{"tlsport is the HTTP port", fe + "tlsport = 80\nrule = local .*\n", 4, "fe", "tlsport", "already the HTTP port"},
		{"tlsport out of range", fe + "tlsport = 70000\nrule = local .*\n", 4, "fe", "tlsport", "0 to 65535"},
		{"bad redirecttlsport", be + "redirecttlsport = 0\n", 6, "be", "redirecttlsport", "not a port"},
		{"bad proxyprotocol", be + "proxyprotocol = maybe\n", 6, "be", "proxyprotocol", "on"},
		{"queuenum out of range", fe + "queuenum = 70000\nrule = local .*\n", 4, "fe", "queuenum", "0 to 65535"},
		{"negative drain", be + "drain = -1s\n", 6, "be", "drain", "duration"},
		{"loglevel out of range", "[global]\nloglevel = 9\n" + fe + "rule = local .*\n", 2, "global", "loglevel", "0 to 6"},
		{"no roles", "[global]\nloglevel = 3\n", 0, "", "", "nothing to run"},
		{"line without =", "[fe]\nvaddr 10.0.0.1\n", 2, "fe", "", "key = value"},
		{"unterminated section", "[fe\n", 1, "", "", "unterminated"},
		// Issue 18, item 6: mistakes that were accepted or misreported.
		{"trailing backslash joins no line", fe + "rule = 10.0.0.11 \\.jpg\\\nrule = 10.0.0.11 .*\n", 4, "fe", "rule", "bad regular expression"},
		{"include", fe + "include /etc/tcpha/more.conf\nrule = local .*\n", 4, "fe", "", "includes are not supported"},
		{"key of another section", fe + "rule = local .*\nloglevel = 3\n", 5, "fe", "loglevel", "unknown key; it belongs in [global]"},
		{"FE key in [be]", be + "dtcinterval = 1\n", 6, "be", "dtcinterval", "it belongs in [fe]"},
		{"quoted regexp", fe + "rule = 10.0.0.11 \"\\.jpg$\"\nrule = local .*\n", 4, "fe", "rule", "in quotes, which would be matched literally: write it without them (\\.jpg$)"},
		{"quoted host pattern", fe + "rule = 10.0.0.11 host=\"a\\.com\" .*\n", 4, "fe", "rule", "write host=a\\.com"},
		{"vaddr equals raddr", "[fe]\nraddr = 10.0.0.100\nvaddr = 10.0.0.100\nrule = local .*\n", 3, "fe", "vaddr", "must differ from raddr"},
		{"server is the VIP", "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.100 666\nrule = local .*\n", 3, "fe", "server", "10.0.0.100 is the VIP"},
		{"server is the FE", "[fe]\nraddr = 10.0.0.2\nvaddr = 10.0.0.100\nserver = 10.0.0.2 666\nrule = local .*\n", 4, "fe", "server", "is this FE's raddr"},
		{"feaddr is the VIP", "[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2, 10.0.0.100\n", 5, "be", "feaddr", "10.0.0.100 is the VIP"},
		{"uaddr is an feaddr", "[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.2\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\n", 3, "be", "uaddr", "is an FE's address"},
		{"uaddr is this host's FE", "[global]\nsecret = test-secret-16byte\n[fe]\nraddr = 10.0.0.2\nvaddr = 10.0.0.100\nrule = local .*\n" +
			"[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.2\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.3\n", 9, "be", "uaddr", "is [fe] raddr 10.0.0.2"},
		{"handofftimeout 1ns", fe + "handofftimeout = 1ns\nrule = local .*\n", 4, "fe", "handofftimeout", "below the minimum of 10ms"},
		{"dtcinterval below minimum", fe + "dtcinterval = 1ms\nrule = local .*\n", 4, "fe", "dtcinterval", "below the minimum of 100ms (or 0 to turn it off)"},
		{"timewait below minimum", fe + "timewait = 500ms\nrule = local .*\n", 4, "fe", "timewait", "below the minimum of 1s"},
		{"committimeout below minimum", be + "committimeout = 1ms\n", 6, "be", "committimeout", "below the minimum of 10ms"},
		{"keepalivetimeout below minimum", be + "keepalivetimeout = 10ms\n", 6, "be", "keepalivetimeout", "below the minimum of 1s"},
		{"handoverwait below minimum", "[global]\nhandoverwait = 10ms\n" + fe + "rule = local .*\n", 2, "global", "handoverwait", "below the minimum of 1s"},
		{"one-byte secret", "[global]\nsecret = x\n" + fe + "rule = local .*\n", 2, "global", "secret", "is 1 bytes, want at least 16"},
		{"15-byte secret", "[global]\nsecret = 123456789012345\n" + fe + "rule = local .*\n", 2, "global", "secret", "is 15 bytes, want at least 16"},
		{"placeholder secret", "[global]\nsecret = change-me-to-a-long-random-string\n" + fe + "rule = local .*\n", 2, "global", "secret", "the sample's placeholder: replace it"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("bad.conf", []byte(tc.text))
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("err = %v, want *config.Error", err)
			}
			if ce.File != "bad.conf" || ce.Line != tc.line || ce.Section != tc.section || ce.Key != tc.key {
				t.Errorf("at %s:%d [%s] %s, want line %d [%s] %s (%v)",
					ce.File, ce.Line, ce.Section, ce.Key, tc.line, tc.section, tc.key, err)
			}
			if !strings.Contains(err.Error(), tc.msgContaining) {
				t.Errorf("error %q does not say %q", err, tc.msgContaining)
			}
		})
	}
}

// What is legal but probably not meant is warned of, placed like an error
// (issue 18, item 6); the rest of the config still parses.
func TestWarnings(t *testing.T) {
	head := "[global]\nsecret = test-secret-16byte\n[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nserver = 10.0.0.12 666\nserver = 10.0.0.13 666 weight=0\n"
	// line 9 is the first rule
	cases := []struct {
		name  string
		rules string
		want  []string
	}{
		{"catch-all last", "rule = 10.0.0.12 \\.jpg$\nrule = 10.0.0.11 .*\n", nil},
		{"no catch-all", "rule = 10.0.0.12 \\.jpg$\nrule = 10.0.0.11 ^/api/\n",
			[]string{"w.conf:9: [fe] rule: no catch-all rule (such as `rule = local .*` last): an HTTP request that matches no rule is answered 503"}},
		{"shadowed by .*", "rule = 10.0.0.11 .*\nrule = 10.0.0.12 \\.jpg$\n",
			[]string{"w.conf:9: [fe] rule: shadowed by the rule on line 8, which matches every request this one does: it takes requests only when every BE of that rule is unavailable, drained or of weight 0"}},
		{"shadowed by ^/ and local", "rule = local ^/\nrule = 10.0.0.12 \\.jpg$\nrule = 10.0.0.11 .*\n",
			[]string{"w.conf:9: [fe] rule: shadowed by the rule on line 8, which matches every request this one does: it takes requests never: a local rule always takes the request",
				"w.conf:10: [fe] rule: shadowed by the rule on line 8"}},
		{"host-only rule is no catch-all", "rule = 10.0.0.11 host=a\\.com\nrule = 10.0.0.12 \\.jpg$\n",
			[]string{"w.conf:9: [fe] rule: no catch-all rule"}},
		{"path rule with host shadows that host only", "rule = 10.0.0.11 host=a\\.com .*\nrule = 10.0.0.12 host=b\\.com \\.jpg$\n" +
			"rule = 10.0.0.12 host=a\\.com \\.png$\nrule = 10.0.0.11 .*\n",
			[]string{"w.conf:10: [fe] rule: shadowed by the rule on line 8"}},
		{"weight 0 on the only target", "rule = 10.0.0.13 \\.jpg$\nrule = 10.0.0.13,10.0.0.11 \\.png$\nrule = 10.0.0.11 .*\n",
			[]string{"w.conf:8: [fe] rule: every target (10.0.0.13) has weight 0: the rule takes no request until one's weight is raised (tcphactl weight)"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("w.conf", []byte(head+tc.rules))
			if err != nil {
				t.Fatal(err)
			}
			if len(c.Warnings) != len(tc.want) {
				t.Fatalf("warnings = %q, want %d like %q", c.Warnings, len(tc.want), tc.want)
			}
			for i, w := range tc.want {
				if !strings.HasPrefix(c.Warnings[i], w) {
					t.Errorf("warning %d = %q, want it to start with %q", i, c.Warnings[i], w)
				}
			}
		})
	}
}

// A UTF-8 byte-order mark (an editor's) is not read as part of the first
// line: it gave "want key = value" (issue 18).
func TestByteOrderMark(t *testing.T) {
	cfg, err := Parse("bom.conf", []byte("\xef\xbb\xbf[fe]\nvaddr = 10.0.0.100\nrule = local .*\n"))
	if err != nil || cfg.FE == nil {
		t.Fatalf("%v", err)
	}
}

// Comments after values, weights, lists of targets and schedulers, as an
// operator writes them.
func TestSchedulingSyntax(t *testing.T) {
	c, err := Parse("t.conf", []byte(`[global]
secret = test-secret-16byte
[fe]
vaddr = 10.0.0.100   # the VIP
port = 8080 ; not 80
scheduler = wlc
server = 10.0.0.11 666 weight=3   # big box
server = 10.0.0.12 666
server = 10.0.0.13 666 weight=0
rule = 10.0.0.11,10.0.0.12 scheduler=lard \.html$   # pages
rule = 10.0.0.13 ^/a#b;c$
rule = 10.0.0.12,10.0.0.11 .*
`))
	if err != nil {
		t.Fatal(err)
	}
	fe := c.FE
	if fe.VAddr.String() != "10.0.0.100" || fe.Port != 8080 || fe.FEPort != 8080 || fe.Scheduler != backends.WLC {
		t.Errorf("fe = %+v", fe)
	}
	if fe.Servers[0].Weight != 3 || fe.Servers[1].Weight != 1 || fe.Servers[2].Weight != 0 {
		t.Errorf("weights: %+v", fe.Servers)
	}
	r := fe.Rules
	if len(r) != 3 || r[0].TargetString() != "10.0.0.11,10.0.0.12" || r[0].Policy != backends.LARD ||
		r[0].Pattern.String() != `\.html$` || r[1].Pattern.String() != "^/a#b;c$" || r[2].Policy != "" {
		t.Errorf("rules: %+v", r)
	}
	if fe.Rise != 2 || fe.Fall != 3 {
		t.Errorf("rise %d fall %d", fe.Rise, fe.Fall)
	}
}

// Host rules: host= before or after scheduler=, with or without a path
// pattern (issue 16).
func TestHostRules(t *testing.T) {
	c, err := Parse("t.conf", []byte(`[global]
secret = test-secret-16byte
[fe]
vaddr = 10.0.0.100
server = 10.0.0.11 666
server = 10.0.0.12 666
rule = 10.0.0.12 host=img\.example\.com
rule = 10.0.0.11,10.0.0.12 host=(www\.)?example\.com scheduler=wlc ^/api/ x
rule = 10.0.0.11 scheduler=lard host=.*\.example\.org \.html$
rule = 10.0.0.11 .*
`))
	if err != nil {
		t.Fatal(err)
	}
	r := c.FE.Rules
	if r[0].Host.String() != `img\.example\.com` || r[0].Pattern != nil {
		t.Errorf("host-only rule: %+v", r[0])
	}
	if r[1].Host.String() != `(www\.)?example\.com` || r[1].Policy != backends.WLC || r[1].Pattern.String() != "^/api/ x" {
		t.Errorf("host, scheduler, pattern: %+v", r[1])
	}
	if r[2].Host.String() != `.*\.example\.org` || r[2].Policy != backends.LARD || r[2].Pattern.String() != `\.html$` {
		t.Errorf("scheduler, host, pattern: %+v", r[2])
	}
	if r[3].Host != nil {
		t.Errorf("path-only rule has a host: %+v", r[3])
	}
}

func TestLoadNamesFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tcpha.conf")
	if err := os.WriteFile(p, []byte("[fe]\nvaddr = x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Load(p)
	if err == nil || !strings.HasPrefix(err.Error(), p+":2: [fe] vaddr:") {
		t.Errorf("err = %v, want it to start with %s:2: [fe] vaddr:", err, p)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.conf")); err == nil {
		t.Error("missing file: no error")
	}
}

// The sample configs shipped in etc/ must parse.
func TestShippedSamples(t *testing.T) {
	files, _ := filepath.Glob("../etc/tcpha*.conf") // keepalived.conf is keepalived's
	if len(files) == 0 {
		t.Fatal("no etc/*.conf samples found")
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := parseSample(f, string(b)); err != nil {
			t.Errorf("%v", err)
		}
	}
}

// parseSample parses a shipped sample (etc/, README), which carries the
// placeholder secret by design: as shipped it must be refused at the
// placeholder's line, and with a secret of the operator's own it must
// parse, without warnings.
func parseSample(name, text string) (*Config, error) {
	if strings.Contains(text, SampleSecret) {
		_, err := Parse(name, []byte(text))
		var ce *Error
		if !errors.As(err, &ce) || ce.Key != "secret" || !strings.Contains(ce.Msg, "placeholder") {
			return nil, fmt.Errorf("%s as shipped: err = %v, want the placeholder secret refused", name, err)
		}
		text = strings.ReplaceAll(text, SampleSecret, "6f1c0e5b9d2a4c7e8b3f0a1d2c4e6f80")
	}
	c, err := Parse(name, []byte(text))
	if err != nil {
		return nil, err
	}
	if len(c.Warnings) > 0 {
		return nil, fmt.Errorf("%s: warnings: %q", name, c.Warnings)
	}
	return c, nil
}

// Every ini sample in the README parses, and says what it seems to say: no
// value keeps a comment that followed it on its line.
func TestReadmeSamples(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := strings.Split(string(b), "```ini\n")[1:]
	if len(blocks) == 0 {
		t.Fatal("no ini samples in README.md")
	}
	for i, blk := range blocks {
		text, _, _ := strings.Cut(blk, "```")
		c, err := parseSample(fmt.Sprintf("README.md sample %d", i+1), text)
		if err != nil {
			t.Errorf("%v", err)
			continue
		}
		for _, r := range append(feRules(c), beRules(c)...) {
			// A host-only rule has no path pattern.
			if r.Pattern != nil && strings.ContainsAny(r.Pattern.String(), "#;") {
				t.Errorf("sample %d: rule pattern %q kept a comment", i+1, r.Pattern)
			}
		}
	}
}

func feRules(c *Config) []backends.Rule {
	if c.FE == nil {
		return nil
	}
	return c.FE.Rules
}

func beRules(c *Config) []backends.Rule {
	if c.BE == nil {
		return nil
	}
	return c.BE.Rules
}

// FuzzParse: any file is parsed or refused with a config error naming the
// file, never a panic; what parses is usable.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"[global]\nsecret = test-secret-16byte\n[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.11 .*\n",
		"[global]\nsecret = test-secret-16byte\n[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\n",
		"[fe]\nvaddr = 10.0.0.100\nrule = local ^/a(b|c)*$\nmaxclients = 3\ndrain = 500ms\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Parse("fuzz.conf", b)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "fuzz.conf") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		if c.FE == nil && c.BE == nil {
			t.Fatal("a config with no role parsed")
		}
		if c.FE != nil {
			if !c.FE.VAddr.Is4() || c.FE.MaxClients < 1 || len(c.FE.Rules) == 0 {
				t.Fatalf("unusable FE: %+v", c.FE)
			}
			for _, r := range c.FE.Rules {
				r.Pattern.MatchString("/x")
			}
		}
		if c.BE != nil && (!c.BE.VAddr.Is4() || len(c.BE.FEAddrs) == 0) {
			t.Fatalf("unusable BE: %+v", c.BE)
		}
	})
}

// [fe] check and checkexpect, and a BE's own lines over them; bad ones
// are refused with their place.
func TestChecks(t *testing.T) {
	c, err := Parse("fe.conf", []byte(goodFE))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.FE.Check.String(); got != "HEAD / host=localhost expect=200-399" {
		t.Errorf("default check: %q", got)
	}
	c, err = Parse("fe.conf", []byte(goodFE+"check = GET /health host=www.example\ncheckexpect = 200,204\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.FE.Check.String(); got != "GET /health host=www.example expect=200,204" {
		t.Errorf("check: %q", got)
	}
	be := "[global]\nsecret = test-secret-16byte\n[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\n"
	c, err = Parse("be.conf", []byte(be))
	if err != nil {
		t.Fatal(err)
	}
	if c.BE.Check.Method != "" || c.BE.Check.Expect != nil {
		t.Errorf("a BE without check lines overrides: %+v", c.BE.Check)
	}
	c, err = Parse("be.conf", []byte(be+"checkexpect = 200-299\n"))
	if err != nil || c.BE.Check.Method != "" || c.BE.Check.Expect.String() != "200-299" {
		t.Errorf("[be] checkexpect alone: %+v %v", c.BE.Check, err)
	}
	for text, want := range map[string]string{
		goodFE + "check = /health\n":                                      "fe.conf:17: [fe] check: ",
		goodFE + "checkexpect = 2xx\n":                                    "fe.conf:17: [fe] checkexpect: ",
		be + "check = GET health\n":                                       "be.conf:8: [be] check: ",
		be + "checkexpect = 200-600\n":                                    "be.conf:8: [be] checkexpect: ",
		strings.Replace(be, "[global]\n", "[global]\ncheck = GET /\n", 1): "[global] check: unknown key; it belongs in [fe] or [be]",
	} {
		_, err := Parse(strings.SplitN(want, ":", 2)[0], []byte(text))
		if strings.HasPrefix(want, "[") {
			_, err = Parse("be.conf", []byte(text))
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", text[len(text)-25:], err, want)
		}
	}
}
