package transplant

import (
	"bufio"
	"bytes"
	"context"
	"crypto/md5"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"tcpha/handoff/repair"
	"tcpha/handoff/wire"
	"tcpha/internal/privtest"
)

var (
	vip       = netip.MustParseAddr("10.77.0.100")
	clientIP  = netip.MustParseAddr("10.77.0.2")
	wwwAddr   = netip.MustParseAddrPort("127.0.0.1:8080")
	vipListen = netip.AddrPortFrom(vip, 80)
)

// lab is a server namespace (the VIP on lo, nginx on 127.0.0.1:8080, a
// "FE-side" listener on VIP:80 in this process) and a client namespace
// behind a veth.
type lab struct {
	srv, cli string
	inSrv    func(func()) // runs fn on a thread in the server namespace
	ln       net.Listener // VIP:80, in the server namespace
	nginx    int          // master pid
	files    map[string][16]byte
	server   *Server
	dir      string // nginx's files and logs
}

// newLab starts nginx with workers and the listen parameters flags
// ("reuseport", "deferred") on wwwAddr.
func newLab(t *testing.T, workers int, flags ...string) *lab {
	t.Helper()
	srv, _ := privtest.NetNS(t)
	cli, _ := privtest.NetNS(t)
	for _, c := range [][]string{
		{"ip", "-n", srv, "link", "add", "s0", "type", "veth", "peer", "name", "c0", "netns", cli},
		{"ip", "-n", srv, "addr", "add", "10.77.0.1/24", "dev", "s0"},
		{"ip", "-n", srv, "addr", "add", vip.String() + "/32", "dev", "lo"},
		{"ip", "-n", srv, "link", "set", "lo", "up"},
		{"ip", "-n", srv, "link", "set", "s0", "up"},
		{"ip", "-n", cli, "addr", "add", clientIP.String() + "/24", "dev", "c0"},
		{"ip", "-n", cli, "link", "set", "lo", "up"},
		{"ip", "-n", cli, "link", "set", "c0", "up"},
		{"ip", "-n", cli, "route", "add", vip.String() + "/32", "via", "10.77.0.1"},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
	l := &lab{srv: srv, cli: cli, inSrv: nsRunner(t, srv), files: map[string][16]byte{}}
	l.startNginx(t, workers, strings.Join(flags, " "))
	var err error
	l.inSrv(func() { l.ln, err = net.Listen("tcp4", vipListen.String()) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.ln.Close() })
	l.server = NewServer(wwwAddr)
	t.Cleanup(func() { l.server.Close() })
	return l
}

// nsRunner starts a goroutine locked to a thread in namespace ns and
// returns a function that runs fn there: sockets made there (the FE's
// listener, the dial to nginx, sock_diag's netlink socket) belong to ns.
func nsRunner(t *testing.T, ns string) func(func()) {
	t.Helper()
	jobs := make(chan func())
	ready := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		h, err := netns.GetFromName(ns)
		if err == nil {
			err = netns.Set(h)
			h.Close()
		}
		ready <- err
		for fn := range jobs {
			fn()
		}
	}()
	if err := <-ready; err != nil {
		t.Fatalf("enter %s: %v", ns, err)
	}
	t.Cleanup(func() { close(jobs) })
	return func(fn func()) {
		done := make(chan struct{})
		jobs <- func() { fn(); close(done) }
		<-done
	}
}

func (l *lab) startNginx(t *testing.T, workers int, flags string) {
	t.Helper()
	dir := t.TempDir()
	l.dir = dir
	// nginx's workers run as nobody: they must reach the files.
	os.Chmod(filepath.Dir(dir), 0o755)
	os.Chmod(dir, 0o755)
	www := filepath.Join(dir, "www")
	if err := os.Mkdir(www, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, size := range map[string]int{"1k": 1024, "20m": 20 << 20} {
		b := make([]byte, size)
		rand.Read(b)
		if err := os.WriteFile(filepath.Join(www, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
		l.files["/"+name] = md5.Sum(b)
	}
	conf := fmt.Sprintf(`worker_processes %[2]d;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events { worker_connections 1024; }
http {
	access_log %[1]s/access.log;
	default_type application/octet-stream;
	sendfile on;
	keepalive_timeout 60s;
	server {
		listen %[3]s %[4]s;
		listen 10.77.0.1:8080; # for a direct download to compare with
		root %[1]s/www;
	}
}
`, dir, workers, wwwAddr, flags)
	cf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	privtest.In(t, l.srv, "nginx", "-e", filepath.Join(dir, "error.log"), "-c", cf)
	pidFile := filepath.Join(dir, "nginx.pid")
	t.Cleanup(func() {
		if l.nginx > 0 {
			syscall.Kill(l.nginx, syscall.SIGQUIT)
			for i := 0; i < 500 && syscall.Kill(l.nginx, 0) == nil; i++ {
				time.Sleep(10 * time.Millisecond)
			}
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "error.log"))
			t.Logf("nginx error log:\n%s", b)
		}
	})
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(pidFile)
		if err == nil {
			l.nginx, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		}
		if l.nginx > 0 && len(l.workers(t)) == workers {
			var c net.Conn
			l.inSrv(func() { c, err = net.Dial("tcp4", wwwAddr.String()) })
			if err == nil {
				c.Close()
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("nginx did not start with %d workers", workers)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// workers lists the nginx master's children.
func (l *lab) workers(t *testing.T) []int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", l.nginx, l.nginx))
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if p, err := strconv.Atoi(f); err == nil {
			pids = append(pids, p)
		}
	}
	return pids
}

// dialClient connects from the client namespace to the VIP.
func (l *lab) dialClient(t *testing.T) net.Conn {
	t.Helper()
	return l.dialFromClient(t, vipListen.String())
}

func (l *lab) dialFromClient(t *testing.T, addr string) net.Conn {
	t.Helper()
	ch := make(chan net.Conn, 1)
	var err error
	go func() {
		runtime.LockOSThread() // never unlocked: the thread is discarded
		var h netns.NsHandle
		if h, err = netns.GetFromName(l.cli); err == nil {
			err = netns.Set(h)
			h.Close()
		}
		if err != nil {
			ch <- nil
			return
		}
		c, derr := net.DialTimeout("tcp4", addr, 5*time.Second)
		err = derr
		ch <- c
	}()
	c := <-ch
	if c == nil {
		t.Fatalf("dial %v from the client namespace: %v", addr, err)
	}
	return c
}

// timing is one transplant's costs.
type timing struct {
	prepare, search, transplant, surgery time.Duration
}

// handOff does the FE's part for one new client connection (feDump) and
// transplants it into nginx. It returns the idle connection's worker.
func (l *lab) handOff(t *testing.T, client net.Conn, path string) (pid int, tm timing) {
	t.Helper()
	ci := l.feDump(t, client, path)
	var idle *Idle
	var err error
	start := time.Now()
	l.inSrv(func() { idle, err = l.server.Prepare(context.Background()) })
	tm.prepare = time.Since(start)
	if err != nil {
		t.Logf("state:\n%s", l.debug(t))
		t.Fatalf("prepare: %v", err)
	}
	tm.search = idle.Search
	pid = idle.PID
	start = time.Now()
	if err := idle.Transplant(ci); err != nil {
		t.Fatalf("transplant into %v: %v", idle, err)
	}
	tm.transplant = time.Since(start)
	tm.surgery = idle.Surgery
	// This process keeps no reference to the server's socket: one would
	// keep it alive after nginx closes it, and its FIN would never leave.
	if held := heldBySelf(idle.Item.Ino); held != "" {
		t.Fatalf("after the transplant this process still holds the socket: %s", held)
	}
	return pid, tm
}

// get reads one response for path (the request already sent, or sent
// here when send is set) and checks the body against the file.
func (l *lab) get(t *testing.T, client net.Conn, br *bufio.Reader, path string, send bool) {
	t.Helper()
	client.SetDeadline(time.Now().Add(20 * time.Second))
	if send {
		if _, err := client.Write([]byte("GET " + path + " HTTP/1.1\r\nHost: www\r\n\r\n")); err != nil {
			t.Fatalf("send %s: %v", path, err)
		}
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("response to %s: %v", path, err)
	}
	h := md5.New()
	n, err := io.Copy(h, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%s: status %d, %d bytes, %v", path, resp.StatusCode, n, err)
	}
	if want := l.files[path]; !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatalf("%s: %d bytes differ from the file", path, n)
	}
}

// closeClean half-closes the client and waits for nginx's FIN.
func closeClean(t *testing.T, client net.Conn, br *bufio.Reader) {
	t.Helper()
	client.(*net.TCPConn).CloseWrite()
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if rest, err := io.ReadAll(br); err != nil || len(rest) > 0 {
		t.Logf("state:\n%s", debugState())
		t.Fatalf("after the client's FIN: %d bytes, %v; want nginx's FIN", len(rest), err)
	}
	client.Close()
}

// outRsts reads Tcp OutRsts of a namespace (/proc/net/snmp).
func outRsts(t *testing.T, ns string) int {
	t.Helper()
	lines := strings.Split(privtest.In(t, ns, "cat", "/proc/net/snmp"), "\n")
	for i := 0; i+1 < len(lines); i++ {
		if strings.HasPrefix(lines[i], "Tcp:") && strings.HasPrefix(lines[i+1], "Tcp:") {
			keys, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
			for j := range keys {
				if keys[j] == "OutRsts" {
					n, _ := strconv.Atoi(vals[j])
					return n
				}
			}
		}
	}
	t.Fatal("no Tcp OutRsts in /proc/net/snmp")
	return 0
}

// owner returns the pid `ss -tnp` names for the client's connection in the
// server namespace.
func (l *lab) owner(t *testing.T, client net.Conn) int {
	t.Helper()
	out := privtest.In(t, l.srv, "ss", "-tnpH", "state", "established", "dst", client.LocalAddr().String())
	i := strings.Index(out, "pid=")
	if i < 0 || !strings.Contains(out, vipListen.String()) {
		t.Fatalf("ss shows no owner of %v ↔ %v:\n%s", client.LocalAddr(), vipListen, out)
	}
	pid, _ := strconv.Atoi(strings.FieldsFunc(out[i+4:], func(r rune) bool { return r < '0' || r > '9' })[0])
	if !strings.Contains(out, `"nginx"`) {
		t.Errorf("ss: the connection is not nginx's:\n%s", out)
	}
	return pid
}

// One connection per order of sizes: the transplanted request, a
// keep-alive request nginx reads itself, a clean close, no RST anywhere,
// and `ss -tnp` naming the nginx worker as the owner.
func testServe(t *testing.T, workers int) {
	privtest.Require(t)
	l := newLab(t, workers)
	debugState = func() string { return l.debug(t) }
	rst0, rstc0 := outRsts(t, l.srv), outRsts(t, l.cli)
	for _, paths := range [][2]string{{"/1k", "/20m"}, {"/20m", "/1k"}} {
		client := l.dialClient(t)
		br := bufio.NewReader(client)
		pid, tm := l.handOff(t, client, paths[0])
		start := time.Now()
		l.get(t, client, br, paths[0], false)
		if paths[0] == "/20m" {
			t.Logf("20 MB served by nginx on the transplanted socket in %v (%.0f MB/s)", time.Since(start), 20/time.Since(start).Seconds())
		}
		if got := l.owner(t, client); got != pid || !slices.Contains(l.workers(t), pid) {
			t.Errorf("ss names pid %d as the owner; the transplant chose %d; workers %v", got, pid, l.workers(t))
		}
		l.get(t, client, br, paths[1], true)
		closeClean(t, client, br)
		t.Logf("%s then %s: worker %d, prepare %v (search %v), transplant %v", paths[0], paths[1], pid, tm.prepare, tm.search, tm.transplant)
	}
	time.Sleep(100 * time.Millisecond) // late RSTs would show by now
	if d, dc := outRsts(t, l.srv)-rst0, outRsts(t, l.cli)-rstc0; d != 0 || dc != 0 {
		t.Errorf("RSTs sent: %d by the server namespace, %d by the client", d, dc)
	}
	// The same download straight from nginx, for comparison.
	direct := l.dialFromClient(t, "10.77.0.1:8080")
	start := time.Now()
	l.get(t, direct, bufio.NewReader(direct), "/20m", true)
	t.Logf("20 MB straight from nginx in %v (%.0f MB/s)", time.Since(start), 20/time.Since(start).Seconds())
	direct.Close()
	// nginx logs the peer it accepted: the dial's 127.0.0.1, not the
	// client (FACTS.md: the lab's IP_TRANSPARENT dial would fix that).
	b, _ := os.ReadFile(filepath.Join(l.dir, "access.log"))
	t.Logf("nginx access log:\n%s", b)
}

func TestTransplantNginx(t *testing.T) { testServe(t, 1) }

func TestTransplantNginxTwoWorkers(t *testing.T) { testServe(t, 2) }

// 50 sequential transplants all work; the timings are logged.
func TestTransplantSequential(t *testing.T) {
	privtest.Require(t)
	l := newLab(t, 2)
	debugState = func() string { return l.debug(t) }
	rst0, rstc0 := outRsts(t, l.srv), outRsts(t, l.cli)
	const n = 50
	var prep, search, trans, surg []time.Duration
	byWorker := map[int]int{}
	for range n {
		client := l.dialClient(t)
		br := bufio.NewReader(client)
		pid, tm := l.handOff(t, client, "/1k")
		l.get(t, client, br, "/1k", false)
		closeClean(t, client, br)
		byWorker[pid]++
		prep, search, trans = append(prep, tm.prepare), append(search, tm.search), append(trans, tm.transplant)
		surg = append(surg, tm.surgery)
	}
	time.Sleep(100 * time.Millisecond)
	if d, dc := outRsts(t, l.srv)-rst0, outRsts(t, l.cli)-rstc0; d != 0 || dc != 0 {
		t.Errorf("RSTs sent: %d by the server namespace, %d by the client", d, dc)
	}
	q := func(ds []time.Duration) string {
		slices.Sort(ds)
		return fmt.Sprintf("p50 %v p90 %v max %v", ds[len(ds)/2], ds[len(ds)*9/10], ds[len(ds)-1])
	}
	t.Logf("%d transplants, by worker %v\nprepare (dial + search): %s\nsearch: %s\ntransplant (wall, thread start included): %s\nsurgery (on the thread): %s",
		n, byWorker, q(prep), q(search), q(trans), q(surg))
}

var debugState func() string

// debug describes the server's processes: their sockets and epoll lists.
func (l *lab) debug(t *testing.T) string {
	var b strings.Builder
	for _, pid := range append([]int{l.nginx}, l.workers(t)...) {
		dir := fmt.Sprintf("/proc/%d/fd/", pid)
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			link, _ := os.Readlink(dir + e.Name())
			fmt.Fprintf(&b, "%d fd %s -> %s\n", pid, e.Name(), link)
			if link == "anon_inode:[eventpoll]" {
				fi, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, e.Name()))
				b.Write(fi)
			}
		}
	}
	b.WriteString(privtest.In(t, l.srv, "ss", "-tanpie"))
	return b.String()
}

// heldBySelf names an fd of any thread of this process that refers to
// socket inode ino.
func heldBySelf(ino uint64) string {
	want := "socket:[" + strconv.FormatUint(ino, 10) + "]"
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, task := range tasks {
		dir := "/proc/self/task/" + task.Name() + "/fd/"
		fds, _ := os.ReadDir(dir)
		for _, f := range fds {
			if l, _ := os.Readlink(dir + f.Name()); l == want {
				return "thread " + task.Name() + " fd " + f.Name()
			}
		}
	}
	return ""
}

// feDump does the FE's part for a new client connection: accept, send the
// client's request for path, read it, block, dump, close silently.
func (l *lab) feDump(t *testing.T, client net.Conn, path string) *wire.ConnInfo {
	t.Helper()
	fe, err := l.ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	req := "GET " + path + " HTTP/1.1\r\nHost: www\r\n\r\n"
	if _, err := client.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	head := make([]byte, len(req))
	fe.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(fe, head); err != nil {
		t.Fatal(err)
	}
	tc := fe.(*net.TCPConn)
	if err := repair.Block(tc); err != nil {
		t.Fatal(err)
	}
	ci, err := repair.Dump(tc, head)
	if err != nil {
		t.Fatal(err)
	}
	if err := repair.CloseSilently(tc); err != nil {
		t.Fatal(err)
	}
	return ci
}

// A transplant that fails before the disconnect leaves the idle connection
// intact and usable; one that fails after it says so, nginx closes its dead
// socket, and the client's connection, untouched, is still restored by the
// fallback (here the test answers it, as the relay would). No RST anywhere.
func TestTransplantFailures(t *testing.T) {
	privtest.Require(t)
	l := newLab(t, 1)
	rst0, rstc0 := outRsts(t, l.srv), outRsts(t, l.cli)
	prepare := func() *Idle {
		var idle *Idle
		var err error
		l.inSrv(func() { idle, err = l.server.Prepare(context.Background()) })
		if err != nil {
			t.Fatal(err)
		}
		return idle
	}

	// Before the disconnect: the worker's fd is not the idle connection.
	client := l.dialClient(t)
	br := bufio.NewReader(client)
	ci := l.feDump(t, client, "/1k")
	idle := prepare()
	ino := idle.Item.Ino
	idle.Item.Ino++
	err := idle.Transplant(ci)
	var e *Error
	if !errors.As(err, &e) || e.Reason != ReasonFDChanged || e.Server != ServerIntact {
		t.Fatalf("transplant with a wrong inode: %v; want fd_changed, intact", err)
	}
	idle.Item.Ino = ino
	if err := idle.Transplant(ci); err != nil {
		t.Fatalf("the intact idle connection, used again: %v", err)
	}
	l.get(t, client, br, "/1k", false)
	closeClean(t, client, br)

	// After the disconnect: the restore fails (a VIP this host lacks).
	client = l.dialClient(t)
	br = bufio.NewReader(client)
	ci = l.feDump(t, client, "/1k")
	idle = prepare()
	bad := *ci
	bad.VIP = netip.AddrPortFrom(netip.MustParseAddr("10.77.0.200"), 80)
	err = idle.Transplant(&bad)
	if !errors.As(err, &e) || e.Reason != ReasonRestore || e.Server != ServerClosed {
		t.Fatalf("transplant onto a foreign VIP: %v; want restore, closed", err)
	}
	t.Logf("the failure, as reported: %v", err)
	want := "socket:[" + strconv.FormatUint(idle.Item.Ino, 10) + "]"
	for i := 0; ; i++ {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", idle.PID))
		held := slices.ContainsFunc(fds, func(f os.DirEntry) bool {
			l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", idle.PID, f.Name()))
			return l == want
		})
		if !held {
			break
		}
		if i == 200 {
			t.Fatal("nginx still holds the dead socket after 2 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The fallback restores the client's connection, which noticed nothing.
	var relay *net.TCPConn
	l.inSrv(func() { relay, err = repair.Restore(ci) })
	if err != nil {
		t.Fatalf("fallback restore: %v", err)
	}
	relay.SetDeadline(time.Now().Add(5 * time.Second))
	req := make([]byte, len(ci.RecvQueue))
	if _, err := io.ReadFull(relay, req); err != nil || !bytes.HasPrefix(req, []byte("GET /1k ")) {
		t.Fatalf("fallback read %q, %v", req, err)
	}
	if _, err := relay.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nrelay")); err != nil {
		t.Fatal(err)
	}
	client.SetDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("client after the fallback: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if string(body) != "relay" {
		t.Fatalf("client read %q", body)
	}
	relay.Close()
	if rest, err := io.ReadAll(br); err != nil || len(rest) > 0 {
		t.Fatalf("after the relay's FIN: %d bytes, %v", len(rest), err)
	}
	client.Close()
	time.Sleep(100 * time.Millisecond)
	if d, dc := outRsts(t, l.srv)-rst0, outRsts(t, l.cli)-rstc0; d != 0 || dc != 0 {
		t.Errorf("RSTs sent: %d by the server namespace, %d by the client", d, dc)
	}
}

// With nginx's reuseport each worker listens on a socket of its own and
// accepts from it: the search must know every worker, not only the
// holder of the listener sock_diag finds.
func TestTransplantReuseport(t *testing.T) {
	privtest.Require(t)
	l := newLab(t, 2, "reuseport")
	debugState = func() string { return l.debug(t) }
	byWorker := map[int]int{}
	for range 20 {
		client := l.dialClient(t)
		br := bufio.NewReader(client)
		pid, _ := l.handOff(t, client, "/1k")
		l.get(t, client, br, "/1k", false)
		closeClean(t, client, br)
		byWorker[pid]++
	}
	t.Logf("20 transplants with reuseport, by worker %v", byWorker)
}

// A listener that defers accept (`listen … deferred`) accepts no idle
// connection: Prepare says so at once instead of waiting for the accept.
func TestTransplantDeferred(t *testing.T) {
	privtest.Require(t)
	l := newLab(t, 1, "deferred")
	var err error
	start := time.Now()
	l.inSrv(func() { _, err = l.server.Prepare(context.Background()) })
	took := time.Since(start)
	if ReasonOf(err) != ReasonDeferred || took > 200*time.Millisecond {
		t.Fatalf("prepare against a deferred listener: %v after %v; want deferred at once", err, took)
	}
}

// Staged, the connection is the server's socket but the server does not
// see it: no answer before Commit. Aborted, nothing reached the client and
// the client's connection is restored elsewhere.
func TestTransplantStageCommitAbort(t *testing.T) {
	privtest.Require(t)
	l := newLab(t, 1)
	rst0, rstc0 := outRsts(t, l.srv), outRsts(t, l.cli)
	prepare := func() *Idle {
		var idle *Idle
		var err error
		l.inSrv(func() { idle, err = l.server.Prepare(context.Background()) })
		if err != nil {
			t.Fatal(err)
		}
		return idle
	}
	client := l.dialClient(t)
	br := bufio.NewReader(client)
	ci := l.feDump(t, client, "/1k")
	st, err := prepare().Stage(ci)
	if err != nil {
		t.Fatal(err)
	}
	client.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := br.Peek(1); err == nil {
		t.Fatal("the client got an answer before the commit")
	}
	if err := st.Commit(); err != nil {
		t.Fatal(err)
	}
	l.get(t, client, br, "/1k", false)
	closeClean(t, client, br)

	client = l.dialClient(t)
	br = bufio.NewReader(client)
	ci = l.feDump(t, client, "/1k")
	idle := prepare()
	if st, err = idle.Stage(ci); err != nil {
		t.Fatal(err)
	}
	if err := st.Abort(); err != nil {
		t.Fatal(err)
	}
	if held := heldBySelf(idle.Item.Ino); held != "" {
		t.Fatalf("after the abort this process still holds the socket: %s", held)
	}
	var relay *net.TCPConn
	l.inSrv(func() { relay, err = repair.Restore(ci) })
	if err != nil {
		t.Fatalf("restore after the abort: %v", err)
	}
	relay.SetDeadline(time.Now().Add(5 * time.Second))
	req := make([]byte, len(ci.RecvQueue))
	if _, err := io.ReadFull(relay, req); err != nil || !bytes.HasPrefix(req, []byte("GET /1k ")) {
		t.Fatalf("restored connection read %q, %v", req, err)
	}
	relay.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nrelay"))
	client.SetDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("client after the abort: %v", err)
	}
	if body, _ := io.ReadAll(resp.Body); string(body) != "relay" {
		t.Fatalf("client read %q", body)
	}
	relay.Close()
	io.ReadAll(br)
	client.Close()
	time.Sleep(100 * time.Millisecond)
	if d, dc := outRsts(t, l.srv)-rst0, outRsts(t, l.cli)-rstc0; d != 0 || dc != 0 {
		t.Errorf("RSTs sent: %d by the server namespace, %d by the client", d, dc)
	}
}
