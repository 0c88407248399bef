package transplant

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"tcpha/handoff/repair"
	"tcpha/handoff/wire"
	"tcpha/internal/netaddr"
	"tcpha/netif"
)

// Server is a web server listening on a loopback address, and the worker
// processes found to serve it (those holding its listening socket and an
// epoll instance). The workers are cached and searched again when a
// dialed connection cannot be found in them (a reload changed them).
type Server struct {
	addr netip.AddrPort

	mu      sync.Mutex
	workers []*worker
	// deferred: the last scan found the listener deferring accept
	// (TCP_DEFER_ACCEPT, nginx's `listen … deferred`): the server accepts
	// a connection only once it brings data, so an idle one never is.
	deferred bool
	// scanned is when the workers were last searched; holders are the
	// processes that held the listener then, whose children a reload's
	// new workers are (an nginx master).
	scanned time.Time
	holders []int
}

// worker is one server process: a pidfd and our duplicates of its epoll
// fds, whose /proc/self/fdinfo lists the epoll's interest list.
type worker struct {
	pid    int
	pidfd  int
	epolls []epollFD
}

type epollFD struct {
	theirs int // the fd number in the worker
	ours   int // our duplicate (pidfd_getfd: same struct file)
}

func (w *worker) close() {
	for _, e := range w.epolls {
		unix.Close(e.ours)
	}
	unix.Close(w.pidfd)
}

// NewServer returns a Server for the web server listening on addr, an
// IPv4 address of this namespace (127.0.0.1:8080).
func NewServer(addr netip.AddrPort) *Server { return &Server{addr: addr} }

// Close releases the cached worker handles. Idle connections prepared
// earlier stay usable: each holds its own handles.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.workers {
		w.close()
	}
	s.workers = nil
	return nil
}

// Idle is one connection dialed to the server and accepted by it, found
// in a worker's epoll, and not yet used: the server's end, fd Item.FD in
// process PID, waits for a request. Transplant turns it into the client's
// connection; Close hangs it up.
type Idle struct {
	PID  int
	Item EpollItem // the server's epoll entry for the accepted socket
	// Search is how long the server's fd took to find, from the dial's
	// completion (the accept wait included).
	Search time.Duration
	// Surgery is how long the last Transplant spent on its private-fd
	// thread (without the thread's start).
	Surgery time.Duration

	conn  *net.TCPConn // our end of the loopback connection
	pidfd int          // the worker's, our own copy
	epfd  int          // our duplicate of the worker's epoll holding Item
	// marked: dialed with SO_MARK (PrepareFrom), which the server's end
	// took (tcp_fwmark_accept); the transplant clears it.
	marked bool
}

// prepareWait is how long Prepare waits for the server to accept and
// register the connection when ctx has no deadline.
const prepareWait = time.Second

// Prepare dials the server and finds the worker and fd that accepted the
// connection (FACTS.md: the accepted socket's inode by sock_diag, which is
// 0 until the server calls accept, matched with the `tfd: N … ino:` lines of
// the worker's epoll fdinfo).
func (s *Server) Prepare(ctx context.Context) (*Idle, error) {
	return s.prepare(ctx, &net.Dialer{KeepAlive: -1}, false)
}

// PrepareFrom is Prepare dialing from src, an address of another host (the
// client's address and port), with IP_TRANSPARENT and SO_MARK mark: the
// server accepts src as its peer and logs it. The namespace must route the
// server's answers to src back through loopback for marked packets (see
// netif.SetupTransparent).
func (s *Server) PrepareFrom(ctx context.Context, src netip.AddrPort, mark int) (*Idle, error) {
	dialer := func(src netip.AddrPort) *net.Dialer {
		return &net.Dialer{
			KeepAlive: -1,
			LocalAddr: net.TCPAddrFromAddrPort(src),
			Control: func(_, _ string, rc syscall.RawConn) error {
				var err error
				if cerr := rc.Control(func(fd uintptr) {
					err = errors.Join(
						wrapOpt("IP_TRANSPARENT", unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)),
						wrapOpt("SO_MARK", unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)))
				}); cerr != nil {
					return cerr
				}
				return err
			},
		}
	}
	idle, err := s.prepare(ctx, dialer(src), true)
	if errors.Is(err, unix.EADDRINUSE) {
		// The client's port is bound here already (this host's own
		// sockets share the port space; a test saw it under load): the
		// address is what the server logs and filters on, any port does.
		idle, err = s.prepare(ctx, dialer(netip.AddrPortFrom(src.Addr(), 0)), true)
	}
	return idle, err
}

func wrapOpt(name string, err error) error {
	if err != nil {
		return fmt.Errorf("set %s: %w", name, err)
	}
	return nil
}

func (s *Server) prepare(ctx context.Context, d *net.Dialer, marked bool) (*Idle, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, prepareWait)
		defer cancel()
	}
	if err := s.checkDeferred(); err != nil {
		return nil, err
	}
	c, err := d.DialContext(ctx, "tcp4", s.addr.String())
	if err != nil {
		return nil, &Error{Reason: ReasonDial, Err: fmt.Errorf("dial %v: %w", s.addr, err)}
	}
	conn := c.(*net.TCPConn)
	start := time.Now()
	idle, err := s.find(ctx, conn)
	if err != nil {
		conn.Close()
		return nil, err
	}
	idle.Search = time.Since(start)
	idle.marked = marked
	return idle, nil
}

// find waits until the server accepted conn and registered it with an epoll
// of one of its workers.
func (s *Server) find(ctx context.Context, conn *net.TCPConn) (*Idle, error) {
	local := netaddr.AddrPort(conn.LocalAddr())
	var ino uint32
	for backoff := 10 * time.Microsecond; ; backoff = min(2*backoff, time.Millisecond) {
		sk, err := netif.LookupTCP(s.addr, local)
		if err != nil && !errors.Is(err, netif.ErrNoSocket) {
			return nil, &Error{Reason: ReasonNotAccepted, Err: fmt.Errorf("find the server's end of %v: %w", local, err)}
		}
		if ino = sk.Inode; ino != 0 {
			break
		}
		if err := sleep(ctx, backoff); err != nil {
			// "no socket" is a lost SYN, state 1 with no inode an
			// accept queue the server did not get to.
			seen := "no socket"
			if sk.State != 0 {
				seen = fmt.Sprintf("state %d, not accepted", sk.State)
			}
			return nil, &Error{Reason: ReasonNotAccepted, Err: fmt.Errorf("server %v did not accept %v (%s): %w", s.addr, local, seen, err)}
		}
	}
	// The server accepts, then registers the socket with its epoll in the
	// same event-loop pass: a miss is retried briefly, then the workers
	// are searched anew (a reload replaced them), and again every
	// rescanEvery while it misses: a scan in the middle of a reload may
	// find the new workers not started yet (a single rescan relayed 750
	// of 2,000 connections across three reloads).
	var scanned time.Time
	for backoff := 10 * time.Microsecond; ; backoff = min(2*backoff, time.Millisecond) {
		idle, err := s.lookIn(uint64(ino))
		if err != nil {
			return nil, err
		}
		if idle != nil {
			idle.conn = conn
			return idle, nil
		}
		if backoff >= time.Millisecond && time.Since(scanned) >= rescanEvery {
			scanned = time.Now()
			// An old worker of a reload accepts, then closes its idle
			// connections as it shuts down: no use waiting for it.
			if sk, err := netif.LookupTCP(s.addr, local); errors.Is(err, netif.ErrNoSocket) || err == nil && sk.State != tcpEstablished {
				return nil, &Error{Reason: ReasonWorkerGone, Err: fmt.Errorf("server %v closed %v before it was found (state %d, %v): a reload?", s.addr, local, sk.State, err)}
			}
			// A failed scan (the old workers gone, the new ones not yet
			// up) is retried on the next pass, until ctx ends.
			if s.rescan() == nil {
				continue
			}
		}
		if err := sleep(ctx, backoff); err != nil {
			return nil, &Error{Reason: ReasonNotInEpoll, Err: fmt.Errorf("socket inode %d (server %v, peer %v) in no worker's epoll (searched %v): %w", ino, s.addr, local, s.workerPIDs(), err)}
		}
	}
}

// workerPIDs lists the workers searched, for errors.
func (s *Server) workerPIDs() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []int
	for _, w := range s.workers {
		out = append(out, w.pid)
	}
	return out
}

// tcpEstablished is TCP_ESTABLISHED (include/net/tcp_states.h).
const tcpEstablished = 1

// rescanEvery spaces the rescans of a search that misses (a /proc walk).
const rescanEvery = 20 * time.Millisecond

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// lookIn searches the cached workers' epolls for the socket inode ino and
// returns an Idle with its own handles, or nil. With no worker cached it
// scans first.
func (s *Server) lookIn(ino uint64) (*Idle, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.workers) == 0 {
		if err := s.rescanLocked(); err != nil {
			return nil, err
		}
	}
	for _, w := range s.workers {
		for _, e := range w.epolls {
			b, err := os.ReadFile("/proc/thread-self/fdinfo/" + strconv.Itoa(e.ours))
			if err != nil {
				return nil, &Error{Reason: ReasonNotInEpoll, Err: fmt.Errorf("read fdinfo of worker %d's epoll %d: %w", w.pid, e.theirs, err)}
			}
			items, err := ParseEpollFdinfo(b)
			if err != nil {
				return nil, &Error{Reason: ReasonNotInEpoll, Err: fmt.Errorf("worker %d's epoll %d: %w", w.pid, e.theirs, err)}
			}
			it, ok := Find(items, ino)
			if !ok {
				continue
			}
			idle := &Idle{PID: w.pid, Item: it, pidfd: -1, epfd: -1}
			if idle.pidfd, err = unix.FcntlInt(uintptr(w.pidfd), unix.F_DUPFD_CLOEXEC, 0); err == nil {
				idle.epfd, err = unix.FcntlInt(uintptr(e.ours), unix.F_DUPFD_CLOEXEC, 0)
			}
			if err != nil {
				idle.closeHandles()
				return nil, &Error{Reason: ReasonNotInEpoll, Err: fmt.Errorf("duplicate worker %d's handles: %w", w.pid, err)}
			}
			return idle, nil
		}
	}
	return nil, nil
}

// checkDeferred scans first when nothing is known of the server, and
// again while its listener defers accept (a reload may change that), and
// refuses to dial a deferring listener: the dial would wait for an accept
// that never comes.
func (s *Server) checkDeferred() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.workers) == 0 || s.deferred {
		// A failure is left to the search after the dial, which scans
		// again: a server just started may not have its workers yet.
		s.rescanLocked()
	}
	if s.deferred {
		return &Error{Reason: ReasonDeferred, Err: fmt.Errorf("server %v listens with TCP_DEFER_ACCEPT (listen … deferred): it accepts no idle connection", s.addr)}
	}
	return nil
}

// rescan searches the workers anew unless a search ran within
// rescanEvery: concurrent handoffs that miss share one (a walk of /proc
// on a busy host takes milliseconds, under the lock every search needs).
func (s *Server) rescan() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if time.Since(s.scanned) < rescanEvery {
		return nil
	}
	return s.rescanLocked()
}

// rescanLocked finds the server's workers anew: the processes whose fds
// include the listening socket, with their epoll fds (an nginx master holds
// the listener but no epoll; its workers hold both).
func (s *Server) rescanLocked() error {
	old := s.workers
	s.workers = nil
	defer func() {
		// An old worker of a reload closes its listener but keeps the
		// connections it accepted just before, ours among them: it is
		// searched while it lives (a search of the new workers alone
		// relayed about half of 2,000 connections across 3 reloads).
		for _, w := range old {
			alive := unix.PidfdSendSignal(w.pidfd, 0, nil, 0) == nil
			if alive && !slices.ContainsFunc(s.workers, func(n *worker) bool { return n.pid == w.pid }) {
				s.workers = append(s.workers, w)
				continue
			}
			w.close()
		}
	}()
	s.deferred = false
	b, err := os.ReadFile("/proc/thread-self/net/tcp") // this thread's namespace (tests switch threads)
	if err != nil {
		return &Error{Reason: ReasonNoWorker, Err: fmt.Errorf("list listeners: %w", err)}
	}
	linos, err := ParseListeners(b, s.addr)
	if err != nil {
		return &Error{Reason: ReasonNoWorker, Err: err}
	}
	if len(linos) == 0 {
		return &Error{Reason: ReasonNoWorker, Err: fmt.Errorf("no listener on %v", s.addr)}
	}
	targets := map[string]bool{}
	for _, ino := range linos {
		targets["socket:["+strconv.FormatUint(ino, 10)+"]"] = true
	}
	s.scanned = time.Now()
	// The last holders and their children first (a reload's new workers
	// are the master's children), then every process.
	procs, err := processesWith(targets, candidates(s.holders))
	if err == nil && !slices.ContainsFunc(procs, func(p proc) bool { return len(p.epolls) > 0 }) {
		procs, err = processesWith(targets, nil)
	}
	if err != nil {
		return &Error{Reason: ReasonNoWorker, Err: err}
	}
	s.holders = s.holders[:0]
	for _, p := range procs {
		s.holders = append(s.holders, p.pid)
	}
	var denied error
	for _, p := range procs {
		pidfd, err := unix.PidfdOpen(p.pid, 0)
		if err != nil {
			if errors.Is(err, unix.EPERM) {
				denied = fmt.Errorf("pidfd_open %d: %w", p.pid, err)
			}
			continue // ESRCH: gone meanwhile
		}
		// Any holder tells, the master too: a server just started may
		// have no worker yet.
		if !s.deferred && deferAccept(pidfd, p.listener) {
			s.deferred = true
		}
		if len(p.epolls) == 0 {
			unix.Close(pidfd)
			continue
		}
		w := &worker{pid: p.pid, pidfd: pidfd}
		for _, fd := range p.epolls {
			dup, err := unix.PidfdGetfd(pidfd, fd, 0)
			if err != nil {
				if errors.Is(err, unix.EPERM) {
					denied = fmt.Errorf("pidfd_getfd %d fd %d: %w", p.pid, fd, err)
				}
				continue
			}
			w.epolls = append(w.epolls, epollFD{theirs: fd, ours: dup})
		}
		if len(w.epolls) == 0 {
			w.close()
			continue
		}
		s.workers = append(s.workers, w)
	}
	if len(s.workers) == 0 {
		if denied != nil {
			return &Error{Reason: ReasonDenied, Err: fmt.Errorf("server %v: %w", s.addr, denied)}
		}
		return &Error{Reason: ReasonNoWorker, Err: fmt.Errorf("server %v: no process holds a listener (inodes %v) with an epoll", s.addr, linos)}
	}
	return nil
}

// deferAccept tells whether the listener fd of the process behind pidfd
// defers accept (TCP_DEFER_ACCEPT > 0).
func deferAccept(pidfd, fd int) bool {
	l, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return false
	}
	defer unix.Close(l)
	v, err := unix.GetsockoptInt(l, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT)
	return err == nil && v > 0
}

// candidates are pids and their children (/proc/PID/task/PID/children,
// CONFIG_PROC_CHILDREN), or nil when pids is empty.
func candidates(pids []int) []int {
	if len(pids) == 0 {
		return nil
	}
	out := slices.Clone(pids)
	for _, p := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", p, p))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil && !slices.Contains(out, c) {
				out = append(out, c)
			}
		}
	}
	return out
}

type proc struct {
	pid      int
	listener int // an fd of one of the targets
	epolls   []int
}

// processesWith walks /proc for the processes holding a file whose link
// is one of targets (the listeners: with `reuseport` each worker has its
// own), and lists their epoll fds.
// Only the processes in pids are looked at when it is not nil.
func processesWith(targets map[string]bool, pids []int) ([]proc, error) {
	if pids == nil {
		ents, err := os.ReadDir("/proc")
		if err != nil {
			return nil, fmt.Errorf("list processes: %w", err)
		}
		for _, e := range ents {
			if pid, err := strconv.Atoi(e.Name()); err == nil {
				pids = append(pids, pid)
			}
		}
	}
	self := os.Getpid()
	var out []proc
	for _, pid := range pids {
		if pid == self {
			continue
		}
		dir := "/proc/" + strconv.Itoa(pid) + "/fd/"
		fds, err := os.ReadDir(dir)
		if err != nil {
			continue // gone, or a kernel thread
		}
		p := proc{pid: pid}
		holds := false
		for _, f := range fds {
			l, err := os.Readlink(dir + f.Name())
			if err != nil {
				continue
			}
			switch {
			case targets[l]:
				if !holds {
					p.listener, _ = strconv.Atoi(f.Name())
				}
				holds = true
			case l == "anon_inode:[eventpoll]":
				if n, err := strconv.Atoi(f.Name()); err == nil {
					p.epolls = append(p.epolls, n)
				}
			}
		}
		if holds {
			out = append(out, p)
		}
	}
	return out, nil
}

func (i *Idle) closeHandles() {
	if i.pidfd >= 0 {
		unix.Close(i.pidfd)
		i.pidfd = -1
	}
	if i.epfd >= 0 {
		unix.Close(i.epfd)
		i.epfd = -1
	}
}

// Close hangs up an unused idle connection (an ordinary close: the server
// reads EOF and closes its end). It is idempotent.
func (i *Idle) Close() error {
	i.closeHandles()
	if i.conn == nil {
		return nil
	}
	err := i.conn.Close()
	i.conn = nil
	return err
}

// Transplant rebuilds the client connection ci describes (a dump, as
// handoff/repair's Rebuild takes it) onto the server's end of the idle
// connection, and gives it back to the server, which then reads the
// request in ci.RecvQueue and answers the client itself: Stage and Commit
// in one.
//
// The client's packets must not reach this host during the call (the FE
// holds them until the BE's commit): nothing is sent to the client, and on
// failure ci can still be restored elsewhere (the relay). A failure's
// Error says whether the idle connection survived (ServerIntact: it may be
// used again) or not (ServerClosed). After success or ServerClosed the
// Idle is spent and its handles released.
func (i *Idle) Transplant(ci *wire.ConnInfo) error {
	st, err := i.Stage(ci)
	if err != nil {
		return err
	}
	return st.Commit()
}

// Staged is a client connection rebuilt onto the server's socket and still
// in repair mode, hidden from the server's epoll: the server does not see
// it and nothing reaches the client. Commit gives it to the server; Abort
// takes it off again without a packet. Exactly one of them must be called:
// the surgery thread (with its private fd table) waits for it.
type Staged struct {
	idle *Idle
	next chan bool   // true: commit, false: abort
	done chan *Error // the thread's last word
	once sync.Once
	err  *Error
}

// Stage does the surgery of Transplant up to the restore, and leaves the
// socket in repair mode and out of the server's epoll until Commit (the
// BE stages before it acks the FE's offer, and commits on the FE's
// commit, so the server answers only once the FE forwards the client's
// ACKs). Errors are as Transplant's.
func (i *Idle) Stage(ci *wire.ConnInfo) (*Staged, error) {
	if i.conn == nil {
		return nil, &Error{Reason: ReasonFDChanged, Server: ServerIntact, Err: errors.New("idle connection already used or closed")}
	}
	st := &Staged{idle: i, next: make(chan bool, 1), done: make(chan *Error, 1)}
	staged := make(chan *Error, 1)
	go privateThread(func() *Error {
		start := time.Now()
		finish, e := i.stage(ci)
		i.Surgery = time.Since(start)
		staged <- e
		if e != nil {
			return e
		}
		commit := <-st.next
		start = time.Now()
		e = finish(commit)
		i.Surgery += time.Since(start)
		return e
	}, st.done)
	var e *Error
	select {
	case e = <-staged:
	case e = <-st.done: // the thread failed before the surgery
	}
	if e == nil {
		return st, nil
	}
	if e.Server == ServerClosed {
		i.spend()
	}
	return nil, e
}

// spend lets go of an Idle whose server socket now is the client's (or
// dead): our end's peer is gone without a packet, so it is closed the
// same way.
func (i *Idle) spend() {
	if i.conn != nil {
		repair.CloseSilently(i.conn)
		i.conn = nil
	}
	i.closeHandles()
}

// Commit leaves repair mode and gives the socket back to the server's
// epoll, which wakes the server with the request. On failure the socket is
// taken off the client's connection again without a packet (ServerClosed)
// and the client's dump can still be restored elsewhere. The Idle is spent
// either way.
func (s *Staged) Commit() error { return s.end(true) }

// Abort takes the client connection off the server's socket without a
// packet and gives the dead socket back to the server, which closes it.
func (s *Staged) Abort() error { return s.end(false) }

func (s *Staged) end(commit bool) error {
	s.once.Do(func() {
		s.next <- commit
		s.err = <-s.done
		s.idle.spend()
	})
	if s.err != nil {
		return s.err
	}
	return nil
}

// onPrivateFDTable runs fn on a thread with a private copy of the fd table.
//
// The surgery needs the server's socket under the fd number the server has
// for it (epoll entries are keyed by (file, fd)), and that number may be
// taken in this process. So it runs on a thread whose fd table is its own
// copy (unshare CLONE_FILES), where dup3 onto the number replaces only the
// private entry. The thread stays locked, so when the goroutine ends the
// runtime ends the thread and the copy goes with it. Never the main thread:
// the runtime does not end it (a goroutine exiting locked to it wedges it
// instead), and its table is the one /proc/<pid>/fd shows; a test saw the
// private copy kept a transplanted socket alive after nginx closed it (no
// FIN) and hid later epoll duplicates from the search. fn makes only raw
// syscalls, so the runtime's own fds (netpoll) are not used from the thread.
func onPrivateFDTable(fn func() *Error) *Error {
	done := make(chan *Error, 1)
	go privateThread(fn, done)
	return <-done
}

func privateThread(fn func() *Error, done chan<- *Error) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// Hold the main thread while another goroutine, which then cannot
		// be scheduled here, does the work.
		inner := make(chan *Error, 1)
		go privateThread(fn, inner)
		e := <-inner
		runtime.UnlockOSThread()
		done <- e
		return
	}
	if err := unix.Unshare(unix.CLONE_FILES); err != nil {
		done <- &Error{Reason: ReasonThread, Server: ServerIntact, Err: fmt.Errorf("unshare CLONE_FILES: %w", err)}
		return
	}
	done <- fn()
}

// stage runs on the thread with the private fd table: the surgery up to
// the restore. finish, on the same thread, commits or aborts it.
func (i *Idle) stage(ci *wire.ConnInfo) (finish func(commit bool) *Error, _ *Error) {
	n := i.Item.FD
	intact := func(r Reason, err error) *Error { return &Error{Reason: r, Server: ServerIntact, Err: err} }
	sock, err := unix.PidfdGetfd(i.pidfd, n, 0)
	switch {
	case errors.Is(err, unix.ESRCH):
		return nil, intact(ReasonWorkerGone, fmt.Errorf("pidfd_getfd %d fd %d: %w", i.PID, n, err))
	case errors.Is(err, unix.EPERM):
		return nil, intact(ReasonDenied, fmt.Errorf("pidfd_getfd %d fd %d: %w", i.PID, n, err))
	case err != nil:
		return nil, intact(ReasonFDChanged, fmt.Errorf("pidfd_getfd %d fd %d: %w", i.PID, n, err))
	}
	var st unix.Stat_t
	if err := unix.Fstat(sock, &st); err != nil || st.Ino != i.Item.Ino {
		unix.Close(sock)
		return nil, intact(ReasonFDChanged, fmt.Errorf("worker %d fd %d is inode %d, want %d (%v)", i.PID, n, st.Ino, i.Item.Ino, err))
	}
	ep := i.epfd
	if ep == n {
		// Our epoll duplicate sits on the number we need.
		if ep, err = unix.FcntlInt(uintptr(i.epfd), unix.F_DUPFD_CLOEXEC, n+1); err != nil {
			unix.Close(sock)
			return nil, intact(ReasonThread, fmt.Errorf("move the epoll duplicate off fd %d: %w", n, err))
		}
	}
	// The socket stays at its own number sock; it is put at nginx's
	// number n only for each epoll_ctl (epollCtlAs). The private table dies
	// with the thread, but closing here makes sure this process holds no
	// reference once the surgery ends: a stray one would keep the socket
	// alive after the server closes it, and no FIN would leave.
	cleanup := func() {
		unix.Close(sock)
		if ep != i.epfd {
			unix.Close(ep)
		}
	}
	fail := func(e *Error) (func(bool) *Error, *Error) {
		cleanup()
		return nil, e
	}

	// Hide the socket from the server: the disconnect below would wake it
	// with ERR/HUP, its recv would fail (EPERM in repair mode) and it would
	// close, resetting the client (FACTS.md: 10 of 200 survived).
	if err := epollCtlAs(ep, unix.EPOLL_CTL_DEL, n, sock, nil); err != nil {
		return fail(intact(ReasonEpollDel, fmt.Errorf("epoll_ctl DEL fd %d of worker %d: %w", n, i.PID, err)))
	}
	ev := &unix.EpollEvent{Events: i.Item.Events, Fd: int32(uint32(i.Item.Data)), Pad: int32(uint32(i.Item.Data >> 32))}
	readd := func() error { return epollCtlAs(ep, unix.EPOLL_CTL_ADD, n, sock, ev) }
	if err := unix.SetsockoptInt(sock, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1); err != nil {
		return fail(intact(ReasonRepair, errors.Join(fmt.Errorf("set TCP_REPAIR: %w", err), readd())))
	}
	// In repair mode the disconnect sends nothing (tcp_disconnect skips
	// the RST) and leaves the socket CLOSE, unbound from its port.
	if err := disconnect(sock); err != nil {
		return fail(intact(ReasonRepair, errors.Join(fmt.Errorf("repair-mode disconnect: %w", err),
			unix.SetsockoptInt(sock, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP), readd())))
	}
	closed := func(r Reason, err error) *Error {
		return &Error{Reason: r, Server: ServerClosed, Err: errors.Join(err, giveBackDead(sock, readd))}
	}
	// The server's end of a transparent dial took its mark, which routes
	// to loopback: the client's connection must route normally.
	if i.marked {
		if err := unix.SetsockoptInt(sock, unix.SOL_SOCKET, unix.SO_MARK, 0); err != nil {
			return fail(closed(ReasonRestore, fmt.Errorf("clear SO_MARK: %w", err)))
		}
	}
	// Without it the socket computes its MSS from 536 (snd_mss 524,
	// 177 MB/s: FACTS.md).
	if err := unix.SetsockoptInt(sock, unix.IPPROTO_TCP, unix.TCP_MAXSEG, int(ci.MSS)); err != nil {
		return fail(closed(ReasonRestore, fmt.Errorf("set TCP_MAXSEG %d: %w", ci.MSS, err)))
	}
	// getsockopt(TCP_TIMESTAMP) cleared the low bit of the dumped clock:
	// +2 keeps the bit and stays ahead of what the client last saw (PAWS
	// tolerates 1; FACTS.md).
	rc := *ci
	if rc.Options&wire.OptTimestamps != 0 {
		rc.Timestamp += 2
	}
	if err := repair.RestoreFD(sock, &rc); err != nil {
		return fail(closed(ReasonRestore, err))
	}
	return func(commit bool) *Error {
		defer cleanup()
		if !commit {
			// Nothing was sent: the client's connection lives on
			// wherever the FE puts it, the server finds its socket hung
			// up and closes it.
			if err := giveBackDead(sock, readd); err != nil {
				return &Error{Reason: ReasonRepair, Server: ServerClosed, Err: fmt.Errorf("abort: %w", err)}
			}
			return nil
		}
		if err := repair.LeaveRepairFD(sock); err != nil {
			return closed(ReasonRestore, err)
		}
		// The data put in the receive queue in repair mode woke nobody; ADD
		// polls the socket, finds the request and wakes the server, whose
		// later EPOLL_CTL_MOD finds its (file, fd) key again.
		if err := readd(); err != nil {
			err = fmt.Errorf("epoll_ctl ADD fd %d of worker %d: %w", n, i.PID, err)
			// Take the client connection back off the socket without a
			// packet; the server's fd then holds a dead socket it no longer
			// watches, closed by its own timeout.
			rerr := errors.Join(unix.SetsockoptInt(sock, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1), disconnect(sock),
				unix.SetsockoptInt(sock, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP))
			return &Error{Reason: ReasonEpollAdd, Server: ServerClosed, Err: errors.Join(err, rerr)}
		}
		return nil
	}, nil
}

// epollCtlAs runs epoll_ctl(ep, op, n, ev) with sock put at fd number n
// for the call, and whatever n held put back right after. An epoll entry's
// key is (file, fd number), so the call must name nginx's number; but in
// this thread's private table n may be one of the Go runtime's own fds
// (netpoll's epoll or eventfd: nginx's are small numbers too), and the
// runtime uses them from whichever thread runs it: a GC mark termination
// on this thread, with the socket left at n, failed epoll_wait on fd 4
// with EINVAL and killed the agent ("runtime: netpoll failed"). Here the
// window is three raw syscalls with no allocation between them.
func epollCtlAs(ep, op, n, sock int, ev *unix.EpollEvent) error {
	raw := func(trap, a1, a2, a3 uintptr) (uintptr, unix.Errno) {
		r, _, e := unix.RawSyscall(trap, a1, a2, a3)
		return r, e
	}
	ctl := func() unix.Errno {
		_, _, e := unix.RawSyscall6(unix.SYS_EPOLL_CTL, uintptr(ep), uintptr(op), uintptr(n), uintptr(unsafe.Pointer(ev)), 0, 0)
		return e
	}
	if sock == n {
		if e := ctl(); e != 0 {
			return e
		}
		return nil
	}
	saved, e := raw(unix.SYS_FCNTL, uintptr(n), unix.F_DUPFD_CLOEXEC, 0)
	switch {
	case e == unix.EBADF:
		saved = ^uintptr(0) // n is free
	case e != 0:
		return fmt.Errorf("save fd %d: %w", n, e)
	}
	if _, e := raw(unix.SYS_DUP3, uintptr(sock), uintptr(n), unix.O_CLOEXEC); e != 0 {
		if saved != ^uintptr(0) {
			raw(unix.SYS_CLOSE, saved, 0, 0)
		}
		return fmt.Errorf("dup3 onto fd %d: %w", n, e)
	}
	ce := ctl()
	var re unix.Errno
	if saved != ^uintptr(0) {
		_, re = raw(unix.SYS_DUP3, saved, uintptr(n), unix.O_CLOEXEC)
		raw(unix.SYS_CLOSE, saved, 0, 0)
	} else {
		_, re = raw(unix.SYS_CLOSE, uintptr(n), 0, 0)
	}
	if ce != 0 {
		return ce
	}
	if re != 0 {
		return fmt.Errorf("put fd %d back: %w", n, re)
	}
	return nil
}

// giveBackDead returns a disconnected socket to the server after a failed
// restore: disconnected again (whatever the restore connected, nothing was
// sent), out of repair mode, back in the epoll, where the server finds it
// hung up (EPOLLHUP, SO_ERROR ECONNABORTED) and closes it.
func giveBackDead(fd int, readd func() error) error {
	return errors.Join(disconnect(fd),
		unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP),
		readd())
}

// disconnect is connect(fd, {AF_UNSPEC}): x/sys/unix has no AF_UNSPEC
// sockaddr.
func disconnect(fd int) error {
	var sa [unix.SizeofSockaddrInet4]byte // sa_family 0: AF_UNSPEC
	_, _, e := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&sa[0])), uintptr(len(sa)))
	if e != 0 {
		return e
	}
	return nil
}

// String describes the idle connection for logs.
func (i *Idle) String() string {
	return fmt.Sprintf("worker %d fd %d inode %d", i.PID, i.Item.FD, i.Item.Ino)
}
