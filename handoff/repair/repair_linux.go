package repair

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"tcpha/handoff/wire"
	"tcpha/internal/netaddr"
)

// Dump puts conn into repair mode and reads its state. The bytes in
// consumed, already read from the socket by the caller, are put back in
// front of the receive queue so the next owner reads the request whole.
//
// conn stays in repair mode: the caller either closes it (silently: a socket
// closed in repair mode sends nothing and leaves no TIME_WAIT) once the
// connection lives elsewhere, or calls Resume to serve it here after all.
// The connection must already be blocked (Block): a repair-mode socket
// would take the client's retransmissions into a queue nobody reads.
func Dump(conn *net.TCPConn, consumed []byte) (*wire.ConnInfo, error) {
	rc, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("dump: %w", err)
	}
	var ci *wire.ConnInfo
	var derr error
	if err := rc.Control(func(fd uintptr) { ci, derr = dumpFD(int(fd)) }); err != nil {
		return nil, fmt.Errorf("dump: %w", err)
	}
	if derr != nil {
		return nil, derr
	}
	ci.Client = netaddr.AddrPort(conn.RemoteAddr())
	ci.VIP = netaddr.AddrPort(conn.LocalAddr())
	if len(consumed) > 0 {
		ci.RcvSeq -= uint32(len(consumed))
		ci.RecvQueue = append(append([]byte(nil), consumed...), ci.RecvQueue...)
	}
	return ci, nil
}

func dumpFD(fd int) (*wire.ConnInfo, error) {
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, 1); err != nil {
		return nil, fmt.Errorf("dump: set TCP_REPAIR: %w", err)
	}
	var raw [64]byte
	n, err := getsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_INFO, raw[:])
	if err != nil {
		return nil, fmt.Errorf("dump: get TCP_INFO: %w", err)
	}
	info, err := parseTCPInfo(raw[:n])
	if err != nil {
		return nil, fmt.Errorf("dump: %w", err)
	}
	if info.State != tcpEstablished {
		return nil, fmt.Errorf("dump: state %d: %w", info.State, ErrNotEstablished)
	}
	ci := &wire.ConnInfo{Options: info.Options, SndWScale: info.SndWScale, RcvWScale: info.RcvWScale}

	// In repair mode TCP_MAXSEG reads mss_clamp; outside it, mss_cache, and
	// the rebuilt connection's MSS would shrink (FACTS.md).
	mss, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_MAXSEG)
	if err != nil {
		return nil, fmt.Errorf("dump: get TCP_MAXSEG: %w", err)
	}
	ci.MSS = uint16(mss)
	if ci.Options&wire.OptTimestamps != 0 {
		ts, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP)
		if err != nil {
			return nil, fmt.Errorf("dump: get TCP_TIMESTAMP: %w", err)
		}
		ci.Timestamp = uint32(ts)
	}
	var wb [sizeofRepairWindow]byte
	if n, err := getsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, wb[:]); err != nil {
		return nil, fmt.Errorf("dump: get TCP_REPAIR_WINDOW: %w", err)
	} else if ci.Window, err = decodeWindow(wb[:n]); err != nil {
		return nil, fmt.Errorf("dump: %w", err)
	}

	sndNxt, sendq, err := dumpQueue(fd, tcpSendQueue)
	if err != nil {
		return nil, err
	}
	if len(sendq) > 0 {
		unsent, err := unix.IoctlGetInt(fd, unix.SIOCOUTQNSD)
		if err != nil {
			return nil, fmt.Errorf("dump: SIOCOUTQNSD: %w", err)
		}
		ci.Unsent = uint32(unsent)
	}
	rcvNxt, recvq, err := dumpQueue(fd, tcpRecvQueue)
	if err != nil {
		return nil, err
	}
	// TCP_QUEUE_SEQ reads write_seq and rcv_nxt, the ends of the queues.
	// The queue selector stays set: it only matters in repair mode, which
	// the socket leaves by closing or by Resume.
	ci.SndSeq = sndNxt - uint32(len(sendq))
	ci.RcvSeq = rcvNxt - uint32(len(recvq))
	ci.SendQueue, ci.RecvQueue = sendq, recvq
	return ci, nil
}

// peekChunk is how much of a queue one peek reads before asking the
// queue's size: the queues of a connection about to move are almost always
// empty (the FE has read the request, a BE waited for every byte to be
// acknowledged), so the size ioctl is usually not needed.
const peekChunk = 4096

var peekBufs = sync.Pool{New: func() any { return new([peekChunk]byte) }}

// dumpQueue reads one queue's end sequence number and its bytes, without
// consuming them.
func dumpQueue(fd, queue int) (seq uint32, data []byte, err error) {
	name := "send"
	sizeIoctl := uint(unix.SIOCOUTQ)
	if queue == tcpRecvQueue {
		name, sizeIoctl = "receive", uint(unix.SIOCINQ)
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, queue); err != nil {
		return 0, nil, fmt.Errorf("dump %s queue: set TCP_REPAIR_QUEUE: %w", name, err)
	}
	s, err := unix.GetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_QUEUE_SEQ)
	if err != nil {
		return 0, nil, fmt.Errorf("dump %s queue: get TCP_QUEUE_SEQ: %w", name, err)
	}
	buf := peekBufs.Get().(*[peekChunk]byte)
	defer peekBufs.Put(buf)
	n, err := peek(fd, buf[:])
	if err != nil {
		return 0, nil, fmt.Errorf("dump %s queue: peek: %w", name, err)
	}
	if n < peekChunk {
		if n == 0 {
			return uint32(s), nil, nil
		}
		return uint32(s), append([]byte(nil), buf[:n]...), nil
	}
	size, err := unix.IoctlGetInt(fd, sizeIoctl)
	if err != nil {
		return 0, nil, fmt.Errorf("dump %s queue: size: %w", name, err)
	}
	// One extra byte tells us if the queue grew behind the ioctl's back.
	big := make([]byte, size+1)
	if n, err = peek(fd, big); err != nil {
		return 0, nil, fmt.Errorf("dump %s queue: peek %d bytes: %w", name, size, err)
	}
	if n != size {
		return 0, nil, fmt.Errorf("dump %s queue: peeked %d bytes, queue holds %d", name, n, size)
	}
	return uint32(s), big[:n], nil
}

// peek reads a repair queue without consuming it; an empty queue reads as 0
// bytes.
func peek(fd int, b []byte) (int, error) {
	n, _, err := unix.Recvfrom(fd, b, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	if errors.Is(err, unix.EAGAIN) {
		return 0, nil
	}
	return n, err
}

// Block makes the kernel drop every packet that reaches conn's socket
// from now on: a socket filter that accepts nothing (block_linux.go), which
// tcp_v4_rcv runs before any TCP processing (tcp_filter), so nothing is
// queued, acknowledged or answered. This is the seed's HANDOFFING drop (4.8.1)
// for one socket, at the cost of one setsockopt instead of an nft
// transaction. Packets dropped meanwhile are retransmitted by the client to
// whoever owns the connection next.
func Block(conn *net.TCPConn) error { return control(conn, "block", attachDrop) }

// Resume serves a blocked, dumped socket here after a failed handoff: the
// filter goes first, so that the client's answer to the window probe that
// leaving repair mode sends gets through, then repair mode. Repair mode reset
// SO_REUSEADDR (FACTS.md); without it the socket, once closed, would hold
// VIP:port against a new agent's listener for its whole TIME_WAIT.
func Resume(conn *net.TCPConn) error {
	return control(conn, "resume", func(fd int) error {
		if err := detachDrop(fd); err != nil {
			return err
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF); err != nil {
			return fmt.Errorf("clear TCP_REPAIR: %w", err)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return fmt.Errorf("set SO_REUSEADDR again: %w", err)
		}
		return nil
	})
}

// LeaveRepair takes a dumped socket out of repair mode while it stays
// blocked: it is an ordinary socket again, which, should this process die
// before the connection's fate is settled, the kernel closes with a FIN
// instead of dropping it without a word (the client would wait for an
// answer forever). A later CloseSilently still closes it without a packet.
func LeaveRepair(conn *net.TCPConn) error { return control(conn, "leave repair mode", leaveRepairFD) }

func control(conn *net.TCPConn, what string, fn func(fd int) error) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if ferr != nil {
		return fmt.Errorf("%s: %w", what, ferr)
	}
	return nil
}

// CloseSilently closes conn without a FIN or RST and without TIME_WAIT, by
// putting it in repair mode first (tcp_close skips tcp_send_fin and
// tcp_send_active_reset for repair sockets).
func CloseSilently(conn *net.TCPConn) error {
	rc, err := conn.SyscallConn()
	if err == nil {
		var serr error
		err = rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_REPAIR, 1)
		})
		if err == nil {
			err = serr
		}
	}
	cerr := conn.Close()
	if err != nil {
		return fmt.Errorf("close silently: set TCP_REPAIR: %w", err)
	}
	return cerr
}

// Rebuilt is a connection rebuilt from a ConnInfo and still in repair
// mode: it has sent nothing, and receives into its queue whatever reaches
// it.
type Rebuilt struct {
	conn   *net.TCPConn
	client netip.AddrPort
	unsent []byte
}

// Rebuild rebuilds the connection ci describes as a local socket bound to
// ci.VIP, with ci.RecvQueue waiting to be read. The order of the calls is
// the kernel's (FACTS.md, libsoccr): sequence numbers only before connect,
// options after it, the window after the receive queue. The socket stays in
// repair mode until Activate: nothing leaves it before then.
//
// The socket is made by Go's own dialer, the repair setup running in its
// Control hook before bind and connect (which, in repair mode, sends
// nothing and makes the socket ESTABLISHED at once): the connection is then
// registered with the runtime poller once, where wrapping a raw socket with
// net.FileConn cost a dup, a second registration and a close, 17 µs of the
// BE's CPU per handoff (docs/performance.md).
func Rebuild(ci *wire.ConnInfo) (*Rebuilt, error) {
	if ci.Unsent > 0 {
		// Unsent bytes would need a write after repair mode; nothing that
		// tcpha hands off has any (handoff.CheckClient).
		return nil, fmt.Errorf("restore %v: %d unsent bytes in the send queue", ci.Client, ci.Unsent)
	}
	d := net.Dialer{
		LocalAddr: net.TCPAddrFromAddrPort(ci.VIP),
		KeepAlive: -1,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			if err := rc.Control(func(fd uintptr) { serr = prepareFD(int(fd), ci) }); err != nil {
				return err
			}
			return serr
		},
	}
	c, err := d.Dial("tcp4", ci.Client.String())
	if err != nil {
		return nil, fmt.Errorf("restore %v: %w", ci.Client, err)
	}
	conn := c.(*net.TCPConn)
	r := &Rebuilt{conn: conn, client: ci.Client}
	if err := control(conn, "restore", func(fd int) error { return rebuildFD(fd, ci) }); err != nil {
		conn.Close() // still in repair mode: closing sends nothing
		return nil, fmt.Errorf("restore %v: %w", ci.Client, err)
	}
	// Blocked, then out of repair mode: an ordinary socket that takes no
	// packet until Activate. Should this process die before then, the
	// kernel closes it with a FIN, and a client whose connection the FE
	// already forwards here learns it is gone instead of waiting for an
	// answer forever (a repair-mode socket would vanish without a word).
	if err := control(conn, "restore", func(fd int) error {
		if err := attachDrop(fd); err != nil {
			return err
		}
		return leaveRepairFD(fd)
	}); err != nil {
		conn.Close() // still in repair mode: closing sends nothing
		return nil, fmt.Errorf("restore %v: %w", ci.Client, err)
	}
	return r, nil
}

// Activate unblocks the socket, from when it behaves like any connected
// socket.
func (r *Rebuilt) Activate() (*net.TCPConn, error) {
	c := r.conn
	r.conn = nil
	if err := control(c, "activate", detachDrop); err != nil {
		CloseSilently(c)
		return nil, fmt.Errorf("activate %v: %w", r.client, err)
	}
	return c, nil
}

// Discard closes the socket in repair mode: nothing reaches the client and
// no TIME_WAIT is left. It is idempotent.
func (r *Rebuilt) Discard() {
	if r.conn != nil {
		CloseSilently(r.conn)
		r.conn = nil
	}
}

// Restore is Rebuild and Activate in one step.
func Restore(ci *wire.ConnInfo) (*net.TCPConn, error) {
	r, err := Rebuild(ci)
	if err != nil {
		return nil, err
	}
	return r.Activate()
}

// prepareFD is what must happen before bind and connect: SO_REUSEADDR
// before TCP_REPAIR, or bind fails with EADDRINUSE against the other
// connections rebuilt on the same VIP:port (FACTS.md), and both queues'
// sequence numbers, which TCP_QUEUE_SEQ takes only before connect.
func prepareFD(fd int, ci *wire.ConnInfo) error {
	set := func(what string, opt, v int) error {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, opt, v); err != nil {
			return fmt.Errorf("set %s: %w", what, err)
		}
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("set SO_REUSEADDR: %w", err)
	}
	if err := set("TCP_REPAIR", unix.TCP_REPAIR, 1); err != nil {
		return err
	}
	return setQueueSeqs(fd, ci)
}

// setQueueSeqs sets both queues' first sequence numbers; the kernel takes
// TCP_QUEUE_SEQ only from a repair-mode socket in state CLOSE.
func setQueueSeqs(fd int, ci *wire.ConnInfo) error {
	set := func(what string, opt, v int) error {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, opt, v); err != nil {
			return fmt.Errorf("set %s: %w", what, err)
		}
		return nil
	}
	if err := set("TCP_REPAIR_QUEUE send", unix.TCP_REPAIR_QUEUE, tcpSendQueue); err != nil {
		return err
	}
	if err := set("TCP_QUEUE_SEQ send", unix.TCP_QUEUE_SEQ, int(int32(ci.SndSeq))); err != nil {
		return err
	}
	if err := set("TCP_REPAIR_QUEUE receive", unix.TCP_REPAIR_QUEUE, tcpRecvQueue); err != nil {
		return err
	}
	return set("TCP_QUEUE_SEQ receive", unix.TCP_QUEUE_SEQ, int(int32(ci.RcvSeq)))
}

// RestoreFD rebuilds the connection ci describes on fd, a TCP/IPv4 socket
// that is already in repair mode and in state CLOSE, unbound or bound to
// nothing else (a socket disconnected in repair mode, as handoff/transplant
// does to a web server's idle connection): the queues' sequence numbers,
// bind ci.VIP, connect ci.Client (sends nothing in repair mode), then what
// Rebuild does after connect. fd stays in repair mode; the caller leaves it
// with LeaveRepairFD. On error the caller owns the rollback (a repair-mode
// connect(AF_UNSPEC) returns the socket to CLOSE without a packet).
func RestoreFD(fd int, ci *wire.ConnInfo) error {
	if ci.Unsent > 0 {
		return fmt.Errorf("restore %v: %d unsent bytes in the send queue", ci.Client, ci.Unsent)
	}
	if err := setQueueSeqs(fd, ci); err != nil {
		return fmt.Errorf("restore %v: %w", ci.Client, err)
	}
	if err := unix.Bind(fd, sockaddr(ci.VIP)); err != nil {
		return fmt.Errorf("restore %v: bind %v: %w", ci.Client, ci.VIP, err)
	}
	if err := unix.Connect(fd, sockaddr(ci.Client)); err != nil {
		return fmt.Errorf("restore %v: repair-mode connect: %w", ci.Client, err)
	}
	if err := rebuildFD(fd, ci); err != nil {
		return fmt.Errorf("restore %v: %w", ci.Client, err)
	}
	return nil
}

// LeaveRepairFD takes fd out of repair mode without a window probe and sets
// SO_REUSEADDR again (see leaveRepairFD).
func LeaveRepairFD(fd int) error { return leaveRepairFD(fd) }

// rebuildFD is what comes after connect: the options negotiated in the
// handshake this host never saw, the queues, the window.
func rebuildFD(fd int, ci *wire.ConnInfo) error {
	if err := setsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_OPTIONS, encodeRepairOptions(ci)); err != nil {
		return fmt.Errorf("set TCP_REPAIR_OPTIONS: %w", err)
	}
	if ci.Options&wire.OptTimestamps != 0 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_TIMESTAMP, int(int32(ci.Timestamp))); err != nil {
			return fmt.Errorf("set TCP_TIMESTAMP: %w", err)
		}
	}
	if err := writeQueue(fd, tcpRecvQueue, ci.RecvQueue); err != nil {
		return err
	}
	// Sent-but-unacked bytes go in under repair and count as sent.
	if err := writeQueue(fd, tcpSendQueue, ci.SendQueue); err != nil {
		return err
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, tcpNoQueue); err != nil {
		return fmt.Errorf("set TCP_REPAIR_QUEUE none: %w", err)
	}
	// Without the window the connection crawls (78 MB/s against 1 GB/s,
	// FACTS.md). It is checked against rcv_nxt, so it comes after the queue.
	if err := setsockoptRaw(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_WINDOW, encodeWindow(ci.Window)); err != nil {
		return fmt.Errorf("set TCP_REPAIR_WINDOW: %w", err)
	}
	return nil
}

func leaveRepairFD(fd int) error {
	// TCP_REPAIR_OFF would send a window probe, whose only use is to learn
	// the peer's window anew and to draw an ACK (CRIU restores sockets whose
	// peer went on while they were frozen). Here the window comes from the
	// dump, taken a moment ago, and whatever the client sent while its
	// connection was blocked it retransmits by itself: the probe and the
	// client's answer were two packets per handoff for nothing
	// (docs/performance.md).
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP); err != nil {
		return fmt.Errorf("set TCP_REPAIR off: %w", err)
	}
	// Leaving repair mode resets SO_REUSEADDR (FACTS.md).
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("set SO_REUSEADDR again: %w", err)
	}
	return nil
}

func writeQueue(fd, queue int, data []byte) error {
	if len(data) == 0 {
		return nil
	}
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_REPAIR_QUEUE, queue); err != nil {
		return fmt.Errorf("set TCP_REPAIR_QUEUE %d: %w", queue, err)
	}
	if err := writeAll(fd, data); err != nil {
		return fmt.Errorf("fill queue %d with %d bytes: %w", queue, len(data), err)
	}
	return nil
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return err
		}
		b = b[n:]
	}
	return nil
}

func sockaddr(ap netip.AddrPort) *unix.SockaddrInet4 {
	return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
}

func getsockoptRaw(fd, level, opt int, buf []byte) (int, error) {
	l := uint32(len(buf))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return 0, syscall.Errno(e)
	}
	return int(l), nil
}

func setsockoptRaw(fd, level, opt int, buf []byte) error {
	return unix.SetsockoptString(fd, level, opt, string(buf))
}
