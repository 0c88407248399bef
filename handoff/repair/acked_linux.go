package repair

import (
	"context"
	"fmt"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// WaitAcked waits until the client has acknowledged every byte sent on
// conn: nothing in its send queue (SIOCOUTQ) and no segment unacknowledged
// (tcpi_unacked). Only then may a connection move to another BE (seed
// 4.8.2's WILLHANDOFF): the new BE could not retransmit what this one sent.
// It polls, first every 50 µs (the ACK of a response usually comes within a
// round trip here), backing off to 2 ms, until ctx ends.
func WaitAcked(ctx context.Context, conn *net.TCPConn) error {
	rc, err := conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("wait for acks: %w", err)
	}
	wait := 50 * time.Microsecond
	for {
		var outq int
		var info *unix.TCPInfo
		var serr error
		if err := rc.Control(func(fd uintptr) {
			if outq, serr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ); serr != nil {
				return
			}
			info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		}); err != nil {
			return fmt.Errorf("wait for acks: %w", err)
		}
		if serr != nil {
			return fmt.Errorf("wait for acks: %w", serr)
		}
		if info.State != tcpEstablished {
			return fmt.Errorf("wait for acks: state %d: %w", info.State, ErrNotEstablished)
		}
		if outq == 0 && info.Unacked == 0 {
			return nil
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("wait for acks: %d bytes, %d segments unacknowledged: %w", outq, info.Unacked, ctx.Err())
		case <-t.C:
		}
		wait = min(2*wait, 2*time.Millisecond)
	}
}
