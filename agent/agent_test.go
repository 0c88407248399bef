package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"tcpha/admin"
	"tcpha/config"
	"tcpha/handoff/wire"
	"tcpha/internal/testlog"
	"tcpha/phttp"
)

func TestNewLoggerLevels(t *testing.T) {
	cases := map[int]slog.Level{0: slog.LevelError, 1: slog.LevelError, 2: slog.LevelWarn, 3: slog.LevelWarn,
		4: slog.LevelInfo, 5: slog.LevelDebug, 6: slog.LevelDebug}
	for lvl, want := range cases {
		var buf bytes.Buffer
		log, err := NewLogger(config.Global{LogLevel: lvl}, &buf, false)
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		if !log.Enabled(ctx, want) || (want > slog.LevelDebug && log.Enabled(ctx, want-4)) {
			t.Errorf("loglevel %d: %v not enabled, or a lower level is", lvl, want)
		}
	}
	var buf bytes.Buffer
	log, _ := NewLogger(config.Global{LogLevel: 4}, &buf, false)
	log.Debug("hidden")
	log.SetLevel(6)
	log.Debug("shown")
	if s := buf.String(); strings.Contains(s, "hidden") || !strings.Contains(s, "shown") {
		t.Errorf("after SetLevel: %q", s)
	}
	path := filepath.Join(t.TempDir(), "tcpha.log")
	log, err := NewLogger(config.Global{LogLevel: 4, LogFile: path}, io.Discard, false)
	if err != nil {
		t.Fatal(err)
	}
	log.Info("hello", "op", "test")
	// logrotate moves the file away; a reopen writes to a new one.
	os.Rename(path, path+".1")
	log.Info("to the old file")
	if err := log.Reopen(); err != nil {
		t.Fatal(err)
	}
	log.Info("to the new file")
	log.Close()
	if b, _ := os.ReadFile(path + ".1"); !strings.Contains(string(b), "msg=hello op=test") || !strings.Contains(string(b), "to the old file") {
		t.Errorf("rotated logfile holds %q", b)
	}
	if b, _ := os.ReadFile(path); !strings.Contains(string(b), "to the new file") || strings.Contains(string(b), "hello") {
		t.Errorf("reopened logfile holds %q", b)
	}
	if _, err := NewLogger(config.Global{LogFile: "/nonexistent/dir/x.log"}, io.Discard, false); err == nil {
		t.Error("unwritable logfile accepted")
	}
}

// The agent's logger, whatever it writes to, limits a flood of one message:
// its first lines, then one line with the count (issue 19: a stranger's
// connections wrote 4.5 MB of refusals in 10 s).
func TestLoggerLimitsFloods(t *testing.T) {
	for _, journal := range []bool{false, true} {
		synctest.Test(t, func(t *testing.T) {
			var buf testlog.Buffer
			log, err := NewLogger(config.Global{LogLevel: 4}, &buf, journal)
			if err != nil {
				t.Fatal(err)
			}
			l := log.With("role", "be")
			for i := range 85606 {
				l.Warn("control session refused", "op", "control", "peer", fmt.Sprintf("10.0.0.2:%d", 1024+i%60000))
			}
			time.Sleep(logLimits.Interval + time.Second)
			lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
			if n := logLimits.Burst + 1; len(lines) != n || !strings.HasSuffix(lines[n-1], fmt.Sprintf("repeated=%d", 85606-logLimits.Burst)) {
				t.Errorf("journal=%v: %d lines, want %d, the last with the count: %s", journal, len(lines), n, lines[len(lines)-1])
			}
		})
	}
}

// Under systemd each line starts with its syslog priority.
func TestJournalPriorities(t *testing.T) {
	var buf bytes.Buffer
	log, err := NewLogger(config.Global{LogLevel: 6}, &buf, true)
	if err != nil {
		t.Fatal(err)
	}
	l := log.With("role", "fe")
	l.Error("e")
	l.Warn("w")
	l.Info("i")
	l.Debug("d")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	for i, p := range []string{"<3>", "<4>", "<6>", "<7>"} {
		if i >= len(lines) || !strings.HasPrefix(lines[i], p+"time=") || !strings.Contains(lines[i], "role=fe") {
			t.Errorf("line %d: %q, want it to start with %s", i, lines, p)
		}
	}
}

// The agent's commands refuse what its roles cannot do, and change what
// they can.
func TestAdminCommands(t *testing.T) {
	path := filepath.Join(t.TempDir(), "admin.sock")
	ln, err := admin.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lg, _ := NewLogger(config.Global{}, io.Discard, false)
	r := &runner{lg: lg, log: lg.Logger, handovers: make(chan handoverReq), reloads: make(chan chan error)}
	go (&admin.Server{Handle: r.command, Log: lg.Logger}).Serve(ctx, ln)
	for cmd, want := range map[string]string{
		"conns":           "error: conns: this host has no fe or be role",
		"loglevel 9":      "error: loglevel \"9\": want 0 to 6",
		"json loglevel 5": "ok\n{\n  \"loglevel\": 5\n}",
		"loglevel 4":      "ok\nloglevel 4",
		"drain 10.0.0.1":  "error: drain: this host has no fe role",
		"json status":     "ok\n{\n  \"pid\":",
	} {
		out, err := admin.Do(path, cmd, time.Second)
		got := "ok\n" + out
		if err != nil {
			got = "error: " + err.Error()
		}
		if !strings.HasPrefix(got, want) {
			t.Errorf("%q: got %q, want it to start with %q", cmd, got, want)
		}
	}
}

// A BE compiles the FE's cluster frame into its own scheduler, and refuses
// one that does not compile.
func TestClusterOf(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	frame := func(pattern, policy string) []byte {
		b, err := wire.Cluster{PHTTP: wire.PHTTPForward, Policy: policy,
			Servers: []wire.ClusterServer{{Addr: be1, Port: 666, Weight: 1}, {Addr: be2, Port: 666, Weight: 1}},
			Rules:   []wire.ClusterRule{{Targets: []netip.Addr{be2}, Pattern: pattern}, {Targets: []netip.Addr{be1}, Pattern: ".*"}}}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	c, err := clusterOf(frame(`\.jpg$`, "wlc"))
	if err != nil {
		t.Fatal(err)
	}
	if c.phttp != wire.PHTTPForward || !c.sched.Holds("/a.jpg", be2) || c.sched.Holds("/a.jpg", be1) || !c.sched.Holds("/a.html", be1) {
		t.Errorf("compiled cluster routes wrongly")
	}
	for _, bad := range [][]byte{frame(`(`, ""), frame(`x`, "fastest"), []byte{9}} {
		if _, err := clusterOf(bad); err == nil {
			t.Errorf("%q compiled", bad)
		}
	}
}

// A BE routes a later request by the FE's cluster frame: its own content
// here; another BE's to that BE; and with the only BE a rule names out
// (its agent stopped: weight 0 in the frame), to that BE's web server,
// never here (issue 19).
func TestBERoute(t *testing.T) {
	be1, be2 := netip.MustParseAddr("10.0.0.11"), netip.MustParseAddr("10.0.0.12")
	frame := func(w1 uint16) *beCluster {
		p, err := wire.Cluster{PHTTP: wire.PHTTPMulti,
			Servers: []wire.ClusterServer{{Addr: be1, Port: 666, Weight: w1}, {Addr: be2, Port: 666, Weight: 1}},
			Rules:   []wire.ClusterRule{{Targets: []netip.Addr{be2}, Pattern: `\.jpg$`}, {Targets: []netip.Addr{be1}, Pattern: ".*"}}}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		c, err := clusterOf(p)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	b := &be{cfg: &config.BE{RAddr: be2, RedirectPort: 80}}
	t.Cleanup(b.closeWeb)
	b.cluster.Store(frame(1))
	if r := b.route("/a.jpg"); !r.Here {
		t.Errorf("be2's own content: %+v", r)
	}
	if r := b.route("/index.html"); r.Here || len(r.Usable) != 1 || r.Usable[0] != b.webPool(be1) {
		t.Errorf("be1's content, be1 up: %+v", r)
	}
	b.cluster.Store(frame(0))
	if r := b.route("/index.html"); r.Here || len(r.Usable) != 0 || len(r.Named) != 1 || r.Named[0] != b.webPool(be1) {
		t.Errorf("be1's content, be1 out: %+v, want its web server named", r)
	}
}

// The FE checks a BE's migrate request before it moves anything, and says
// what is wrong with a bad one.
func TestParseMigration(t *testing.T) {
	vip := netip.MustParseAddrPort("10.0.0.100:80")
	good := wire.ConnInfo{Client: netip.MustParseAddrPort("10.0.0.10:40000"), VIP: vip, MSS: 1460,
		RecvQueue: []byte("GET /img/a.jpg HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n")}
	frame := func(ci wire.ConnInfo, magic int) wire.Frame {
		p, err := ci.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return wire.Frame{Type: wire.TypeMigrate, ConnMagic: ci.ConnMagic() + uint32(magic), Payload: p}
	}
	ci, path, res, why := parseMigration(frame(good, 0), vip, 64)
	if res != wire.ResultOK || path != "/img/a.jpg" || ci.Client != good.Client {
		t.Fatalf("good request: %v %q %v %s", ci, path, res, why)
	}
	other := good
	other.VIP = netip.MustParseAddrPort("10.0.0.101:80")
	sendq := good
	sendq.SendQueue = []byte("unacked")
	nohead := good
	nohead.RecvQueue = []byte("GET /img/a.jpg HTTP/1.1\r\nHost:")
	for name, tc := range map[string]struct {
		f    wire.Frame
		max  int
		res  wire.Result
		says string
	}{
		"garbage":        {wire.Frame{Type: wire.TypeMigrate, Payload: []byte{1, 2, 3}}, 64, wire.ResultBadFrame, ""},
		"conn_magic":     {frame(good, 1), 64, wire.ResultBadFrame, "conn_magic"},
		"another VIP":    {frame(other, 0), 64, wire.ResultWrongVIP, "10.0.0.101:80"},
		"unacknowledged": {frame(sendq, 0), 64, wire.ResultInvalid, "send queue"},
		"no whole head":  {frame(nohead, 0), 64, wire.ResultInvalid, "no request head"},
		"head too large": {frame(good, 0), 20, wire.ResultInvalid, "within 20 bytes"},
	} {
		_, _, res, why := parseMigration(tc.f, vip, tc.max)
		if res != tc.res || !strings.Contains(why, tc.says) {
			t.Errorf("%s: %v %q, want %v saying %q", name, res, why, tc.res, tc.says)
		}
	}
}

// A migrate request is a BE's bytes: whatever they are, parseMigration
// answers without a panic, and what it accepts is a connection of the
// FE's VIP with nothing unacknowledged and a request head within maxHeader.
func FuzzParseMigration(f *testing.F) {
	vip := netip.MustParseAddrPort("10.0.0.100:80")
	ci := wire.ConnInfo{Client: netip.MustParseAddrPort("10.0.0.10:40000"), VIP: vip, MSS: 1460,
		RecvQueue: []byte("GET /img/a.jpg HTTP/1.1\r\nHost: x\r\n\r\n")}
	p, err := ci.MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(p, ci.ConnMagic(), uint16(64))
	f.Add(p, ci.ConnMagic()+1, uint16(8))
	f.Fuzz(func(t *testing.T, payload []byte, magic uint32, maxHeader uint16) {
		fr := wire.Frame{Type: wire.TypeMigrate, ConnMagic: magic, Payload: payload}
		got, path, res, why := parseMigration(fr, vip, int(maxHeader))
		if res != wire.ResultOK {
			if why == "" {
				t.Fatalf("%v without a reason", res)
			}
			return
		}
		if got.VIP != vip || len(got.SendQueue) > 0 || got.ConnMagic() != magic || path == "" {
			t.Fatalf("accepted %+v, path %q", got, path)
		}
		h, err := phttp.ParseRequest(got.RecvQueue[:min(len(got.RecvQueue), int(maxHeader))])
		if err != nil || h.Len > int(maxHeader) || h.Path != path {
			t.Fatalf("accepted a head of %v bytes (max %d): %v", h, maxHeader, err)
		}
	})
}
