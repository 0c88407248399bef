package transplant

import (
	"errors"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"
)

// Reclaim finds the server's socket with inode ino (a connection
// delivered to it earlier) in its workers' epolls and returns a duplicate
// of it (pidfd_getfd: the same socket), with which a connection moves on
// to another BE (issue 15 item 2): wait for the client's acks, dump, and
// TakeBack.
func (s *Server) Reclaim(ino uint64) (*net.TCPConn, error) {
	idle, err := s.lookIn(ino)
	if err == nil && idle == nil {
		// A reload may have replaced the workers' cache; the old worker
		// that holds this connection is found by a scan.
		if err = s.rescan(); err == nil {
			idle, err = s.lookIn(ino)
		}
	}
	if err != nil {
		return nil, err
	}
	if idle == nil {
		return nil, &Error{Reason: ReasonNotInEpoll, Err: fmt.Errorf("socket inode %d in no worker's epoll", ino)}
	}
	defer idle.closeHandles()
	fd, err := unix.PidfdGetfd(idle.pidfd, idle.Item.FD, 0)
	if err != nil {
		return nil, &Error{Reason: ReasonDenied, Err: fmt.Errorf("pidfd_getfd(worker %d, fd %d): %w", idle.PID, idle.Item.FD, err)}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Ino != ino {
		unix.Close(fd)
		return nil, &Error{Reason: ReasonFDChanged, Err: fmt.Errorf("worker %d's fd %d is no longer socket inode %d (%v)", idle.PID, idle.Item.FD, ino, err)}
	}
	f := os.NewFile(uintptr(fd), "delivered")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("reclaim socket inode %d: %w", ino, err)
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		c.Close()
		return nil, errors.New("reclaim: not a TCP socket")
	}
	return tc, nil
}

// TakeBack takes a reclaimed socket from the server without a packet:
// repair mode, then a disconnect (tcp_disconnect sends nothing in repair
// mode), then out of repair mode, so that the server finds it hung up
// (EPOLLHUP, SO_ERROR ECONNABORTED) and closes its fd, which sends
// nothing either (the socket is CLOSE). conn, the duplicate, is closed.
func TakeBack(conn *net.TCPConn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		conn.Close()
		return fmt.Errorf("take the socket back: %w", err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = errors.Join(unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_REPAIR, 1), disconnect(int(fd)),
			unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_REPAIR, unix.TCP_REPAIR_OFF_NO_WP))
	}); err != nil {
		serr = err
	}
	cerr := conn.Close()
	if serr != nil {
		return fmt.Errorf("take the socket back from the server: %w", serr)
	}
	return cerr
}
