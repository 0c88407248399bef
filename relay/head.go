package relay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"tcpha/internal/accesslog"
	"tcpha/phttp"
)

// errClientGone is a client that closed (or reset) between requests.
var errClientGone = errors.New("client closed")

// quietAfter is how long a session waits for a keep-alive client's next
// request with its buffer held. A busy client sends it at once; one quiet
// that long gives the buffer back and waits without one.
const quietAfter = 50 * time.Millisecond

// readHead reads the next request head. Between requests a quiet
// connection holds no buffer: it waits for the socket to become readable
// first, so an idle keep-alive connection costs its goroutine and its
// socket only.
func (s *session) readHead() (*phttp.Head, error) {
	// Between requests a session can go to a successor as it is: its
	// sockets and the bytes of the next request it has read.
	s.phase.Store(phaseIdle)
	defer s.phase.Store(phaseWork)
	if s.r.handing.Load() {
		return nil, s.exportIdle()
	}
	idleUntil := time.Now().Add(s.r.cfg.IdleTimeout)
	if s.firstAccepted() {
		// A connection this BE accepted (accept = be) has no request
		// yet: like the FE's, it has requesttimeout for its whole first
		// head, counted from now, not idletimeout to start one.
		idleUntil = time.Now().Add(s.r.cfg.HeadTimeout)
	}
	if s.start < s.end && phttp.OnlyEmptyLines(s.buf[s.start:s.end]) {
		// The CRLF some clients send after a body (RFC 9112 section 2.2)
		// does not start a request: the connection is idle, not slow.
		s.start = s.end
	}
	if s.start == s.end {
		s.start, s.end = 0, 0
		if s.buf == nil {
			s.buf = bufs.Get().(*[bufSize]byte)
		}
		s.client.SetReadDeadline(time.Now().Add(quietAfter))
		n, err := s.client.Read(s.buf[:s.max])
		s.end = n
		switch {
		case n > 0:
		case errors.Is(err, os.ErrDeadlineExceeded):
			if s.r.handing.Load() {
				return nil, s.exportIdle()
			}
			s.release()
			s.client.SetReadDeadline(idleUntil)
			if err := waitReadable(s.client); err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) && s.r.handing.Load() {
					return nil, s.exportIdle()
				}
				return nil, err
			}
			s.buf = bufs.Get().(*[bufSize]byte)
		case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
			return nil, errClientGone
		default:
			return nil, err
		}
	}
	headDeadline := time.Now().Add(s.r.cfg.HeadTimeout)
	if s.firstAccepted() {
		headDeadline = idleUntil
	}
	s.client.SetReadDeadline(headDeadline)
	for {
		if s.end > s.start {
			h, err := phttp.ParseRequest(s.buf[s.start:s.end])
			if err == nil {
				return h, nil
			}
			if !errors.Is(err, phttp.ErrIncomplete) {
				return nil, err
			}
			if s.end-s.start >= s.max {
				return nil, fmt.Errorf("%w: no end of head within %d bytes", phttp.ErrHeaderTooLarge, s.max)
			}
		}
		if s.start > 0 {
			copy(s.buf[:], s.buf[s.start:s.end])
			s.end -= s.start
			s.start = 0
		}
		n, err := s.client.Read(s.buf[s.end:s.max])
		s.end += n
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && s.r.handing.Load() {
				return nil, s.exportIdle()
			}
			if s.end == s.start && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
				return nil, errClientGone
			}
			return nil, err
		}
	}
}

// firstAccepted tells whether the session waits for the first request of
// a connection this BE accepted itself.
func (s *session) firstAccepted() bool { return s.accepted && !s.later() }

// waitReadable blocks until c has data (or an error or EOF) without
// reading it.
func waitReadable(c *net.TCPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var one [1]byte
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		_, _, e := unix.Recvfrom(int(fd), one[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		if errors.Is(e, unix.EAGAIN) {
			return false
		}
		if e != nil {
			rerr = e
		}
		return true
	})
	if err != nil {
		return err
	}
	if errors.Is(rerr, unix.ECONNRESET) {
		return errClientGone
	}
	return rerr
}

// refuse ends a connection whose next request could not be read.
func (s *session) refuse(err error) {
	// A silent client of a connection this BE accepted gets the FE's 408,
	// not the idle close of a keep-alive connection between requests.
	status, graceful := refusal(err, s.end > s.start || s.firstAccepted())
	switch {
	case status > 0:
		s.logf().Info("request refused", "op", "relay", "status", status, "err", err)
		s.client.SetWriteDeadline(time.Now().Add(time.Second))
		n, _ := s.client.Write(phttp.ErrorResponse(status, err.Error()))
		if s.r.cfg.Access != nil {
			// No head to name: a bad, oversized or slow one.
			e := s.entry(nil, time.Now())
			e.Status, e.Bytes, e.Served, e.Total = status, int64(n), accesslog.Answered, 0
			s.r.cfg.Access(e)
		}
	case !graceful && !clientLeft(err):
		s.logf().Debug("client read failed", "op", "relay", "err", err)
	}
	if graceful {
		s.closeGracefully()
	}
}

// refusal says how a connection whose next request could not be read (err;
// partial: some bytes of it came) ends: with an error answer of status (0:
// none), and closed gracefully, or at once. A client that left, or whose
// connection failed, gets nothing; one idle too long between requests a
// plain close; one too slow with its head 408; a bad head its 4xx.
func refusal(err error, partial bool) (status int, graceful bool) {
	var ne net.Error
	status = phttp.Status(err)
	switch {
	case clientLeft(err):
		return 0, false
	case status == 0 && errors.As(err, &ne) && ne.Timeout():
		if !partial {
			return 0, true
		}
		return 408, true
	case status == 0:
		return 0, false
	}
	return status, true
}

func clientLeft(err error) bool { return errors.Is(err, errClientGone) || errors.Is(err, io.EOF) }
