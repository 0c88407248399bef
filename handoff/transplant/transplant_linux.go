package transplant

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
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
}

// prepareWait is how long Prepare waits for the server to accept and
// register the connection when ctx has no deadline.
const prepareWait = time.Second

// Prepare dials the server and finds the worker and fd that accepted the
// connection (FACTS.md: the accepted socket's inode by sock_diag, which is
// 0 until the server calls accept, matched with the `tfd: N … ino:` lines of
// the worker's epoll fdinfo).
func (s *Server) Prepare(ctx context.Context) (*Idle, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, prepareWait)
		defer cancel()
	}
	d := net.Dialer{KeepAlive: -1}
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
			return nil, &Error{Reason: ReasonNotAccepted, Err: fmt.Errorf("server %v did not accept %v: %w", s.addr, local, err)}
		}
	}
	// The server accepts, then registers the socket with its epoll in the
	// same event-loop pass: a miss is retried briefly, then the workers
	// are searched anew (a reload replaced them).
	rescanned := false
	for backoff := 10 * time.Microsecond; ; backoff = min(2*backoff, time.Millisecond) {
		idle, err := s.lookIn(uint64(ino))
		if err != nil {
			return nil, err
		}
		if idle != nil {
			idle.conn = conn
			return idle, nil
		}
		if !rescanned && backoff >= time.Millisecond {
			if err := s.rescan(); err != nil {
				return nil, err
			}
			rescanned = true
			continue
		}
		if err := sleep(ctx, backoff); err != nil {
			return nil, &Error{Reason: ReasonNotInEpoll, Err: fmt.Errorf("socket inode %d (server %v, peer %v) in no worker's epoll: %w", ino, s.addr, local, err)}
		}
	}
}

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

func (s *Server) rescan() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rescanLocked()
}

// rescanLocked finds the server's workers anew: the processes whose fds
// include the listening socket, with their epoll fds (an nginx master holds
// the listener but no epoll; its workers hold both).
func (s *Server) rescanLocked() error {
	for _, w := range s.workers {
		w.close()
	}
	s.workers = nil
	lino, err := s.listenerInode()
	if err != nil {
		return &Error{Reason: ReasonNoWorker, Err: err}
	}
	procs, err := processesWith("socket:[" + strconv.FormatUint(uint64(lino), 10) + "]")
	if err != nil {
		return &Error{Reason: ReasonNoWorker, Err: err}
	}
	var denied error
	for _, p := range procs {
		if len(p.epolls) == 0 {
			continue
		}
		pidfd, err := unix.PidfdOpen(p.pid, 0)
		if err != nil {
			if errors.Is(err, unix.EPERM) {
				denied = fmt.Errorf("pidfd_open %d: %w", p.pid, err)
			}
			continue // ESRCH: gone meanwhile
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
		return &Error{Reason: ReasonNoWorker, Err: fmt.Errorf("server %v: no process holds listener inode %d with an epoll", s.addr, lino)}
	}
	return nil
}

// listenerInode looks the listening socket up by sock_diag: the exact
// tuple addr ↔ 0.0.0.0:0 is the listener on addr, or on the wildcard
// address for a server listening on *:port.
func (s *Server) listenerInode() (uint32, error) {
	none := netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	for _, a := range []netip.AddrPort{s.addr, netip.AddrPortFrom(netip.IPv4Unspecified(), s.addr.Port())} {
		sk, err := netif.LookupTCP(a, none)
		if err == nil && sk.Inode != 0 {
			return sk.Inode, nil
		}
		if err != nil && !errors.Is(err, netif.ErrNoSocket) {
			return 0, fmt.Errorf("find the listener of %v: %w", s.addr, err)
		}
	}
	return 0, fmt.Errorf("no listener on %v", s.addr)
}

type proc struct {
	pid    int
	epolls []int
}

// processesWith walks /proc for the processes holding a file whose link
// reads target, and lists their epoll fds.
func processesWith(target string) ([]proc, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	self := os.Getpid()
	var out []proc
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		dir := "/proc/" + e.Name() + "/fd/"
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
			case l == target:
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
// request in ci.RecvQueue and answers the client itself.
//
// The client's packets must not reach this host during the call (the FE
// holds them until the BE's commit): nothing is sent to the client, and on
// failure ci can still be restored elsewhere (the relay). A failure's
// Error says whether the idle connection survived (ServerIntact: it may be
// used again) or not (ServerClosed). After success or ServerClosed the
// Idle is spent and its handles released.
func (i *Idle) Transplant(ci *wire.ConnInfo) error {
	if i.conn == nil {
		return &Error{Reason: ReasonFDChanged, Server: ServerIntact, Err: errors.New("idle connection already used or closed")}
	}
	e := onPrivateFDTable(func() *Error {
		start := time.Now()
		defer func() { i.Surgery = time.Since(start) }()
		return i.surgery(ci)
	})
	if e != nil && e.Server == ServerIntact {
		return e
	}
	// Our end's peer is gone without a packet: close it the same way.
	repair.CloseSilently(i.conn)
	i.conn = nil
	i.closeHandles()
	if e != nil {
		return e
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

// surgery runs on the thread with the private fd table.
func (i *Idle) surgery(ci *wire.ConnInfo) *Error {
	n := i.Item.FD
	intact := func(r Reason, err error) *Error { return &Error{Reason: r, Server: ServerIntact, Err: err} }
	sock, err := unix.PidfdGetfd(i.pidfd, n, 0)
	switch {
	case errors.Is(err, unix.ESRCH):
		return intact(ReasonWorkerGone, fmt.Errorf("pidfd_getfd %d fd %d: %w", i.PID, n, err))
	case errors.Is(err, unix.EPERM):
		return intact(ReasonDenied, fmt.Errorf("pidfd_getfd %d fd %d: %w", i.PID, n, err))
	case err != nil:
		return intact(ReasonFDChanged, fmt.Errorf("pidfd_getfd %d fd %d: %w", i.PID, n, err))
	}
	var st unix.Stat_t
	if err := unix.Fstat(sock, &st); err != nil || st.Ino != i.Item.Ino {
		unix.Close(sock)
		return intact(ReasonFDChanged, fmt.Errorf("worker %d fd %d is inode %d, want %d (%v)", i.PID, n, st.Ino, i.Item.Ino, err))
	}
	ep := i.epfd
	if ep == n {
		// Our epoll duplicate sits on the number we need.
		if ep, err = unix.FcntlInt(uintptr(i.epfd), unix.F_DUPFD_CLOEXEC, n+1); err != nil {
			unix.Close(sock)
			return intact(ReasonThread, fmt.Errorf("move the epoll duplicate off fd %d: %w", n, err))
		}
	}
	if sock != n {
		err := unix.Dup3(sock, n, unix.O_CLOEXEC)
		unix.Close(sock)
		if err != nil {
			return intact(ReasonThread, fmt.Errorf("dup3 onto fd %d: %w", n, err))
		}
	}
	// n is now the server's socket in this thread's table. The private
	// table dies with the thread, but closing here makes sure this process
	// holds no reference once Transplant returns: a stray one would keep
	// the socket alive after the server closes it, and no FIN would leave.
	defer unix.Close(n)
	if ep != i.epfd {
		defer unix.Close(ep)
	}

	// Hide the socket from the server: the disconnect below would wake it
	// with ERR/HUP, its recv would fail (EPERM in repair mode) and it would
	// close, resetting the client (FACTS.md: 10 of 200 survived).
	if err := unix.EpollCtl(ep, unix.EPOLL_CTL_DEL, n, nil); err != nil {
		return intact(ReasonEpollDel, fmt.Errorf("epoll_ctl DEL fd %d of worker %d: %w", n, i.PID, err))
	}
	readd := func() error {
		ev := unix.EpollEvent{Events: i.Item.Events, Fd: int32(uint32(i.Item.Data)), Pad: int32(uint32(i.Item.Data >> 32))}
		return unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, n, &ev)
	}
	if err := unix.SetsockoptInt(n, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1); err != nil {
		return intact(ReasonRepair, errors.Join(fmt.Errorf("set TCP_REPAIR: %w", err), readd()))
	}
	// In repair mode the disconnect sends nothing (tcp_disconnect skips
	// the RST) and leaves the socket CLOSE, unbound from its port.
	if err := disconnect(n); err != nil {
		return intact(ReasonRepair, errors.Join(fmt.Errorf("repair-mode disconnect: %w", err),
			unix.SetsockoptInt(n, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP), readd()))
	}
	closed := func(r Reason, err error) *Error {
		return &Error{Reason: r, Server: ServerClosed, Err: errors.Join(err, giveBackDead(n, readd))}
	}
	// Without it the socket computes its MSS from 536 (snd_mss 524,
	// 177 MB/s: FACTS.md).
	if err := unix.SetsockoptInt(n, unix.IPPROTO_TCP, unix.TCP_MAXSEG, int(ci.MSS)); err != nil {
		return closed(ReasonRestore, fmt.Errorf("set TCP_MAXSEG %d: %w", ci.MSS, err))
	}
	// getsockopt(TCP_TIMESTAMP) cleared the low bit of the dumped clock:
	// +2 keeps the bit and stays ahead of what the client last saw (PAWS
	// tolerates 1; FACTS.md).
	rc := *ci
	if rc.Options&wire.OptTimestamps != 0 {
		rc.Timestamp += 2
	}
	if err := repair.RestoreFD(n, &rc); err != nil {
		return closed(ReasonRestore, err)
	}
	if err := repair.LeaveRepairFD(n); err != nil {
		return closed(ReasonRestore, err)
	}
	// The data put in the receive queue in repair mode woke nobody; ADD
	// polls the socket, finds the request and wakes the server, whose later
	// EPOLL_CTL_MOD finds its (file, fd) key again.
	if err := readd(); err != nil {
		err = fmt.Errorf("epoll_ctl ADD fd %d of worker %d: %w", n, i.PID, err)
		// Take the client connection back off the socket without a
		// packet; the server's fd then holds a dead socket it no longer
		// watches, closed by its own timeout.
		rerr := errors.Join(unix.SetsockoptInt(n, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1), disconnect(n),
			unix.SetsockoptInt(n, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP))
		return &Error{Reason: ReasonEpollAdd, Server: ServerClosed, Err: errors.Join(err, rerr)}
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
