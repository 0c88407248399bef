package be

// Moving a delivered connection to another BE (issue 15 item 2, the seed's
// WILLHANDOFF → HANDOFFING → HANDOFFED on a BE): the packet path holds the
// request for the other BE (its segments dropped, its bytes kept), and
// this file takes the connection from the web server and moves it with
// those bytes, by the same BE-to-BE move as a relayed connection's
// (handoff.Direct, or through the FE: handoff.Leaver).

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"tcpha/handoff"
	"tcpha/handoff/repair"
	"tcpha/handoff/transplant"
	"tcpha/handoff/wire"
	"tcpha/netif"
)

// ackedWithin bounds the wait for the client's acks of every response
// byte and for the server to have read every request it was given: past
// it the request is served here (the state machine's WILLHANDOFF
// --handoff-failed--> ESTABLISHED).
const ackedWithin = 2 * time.Second

// deliveredSocket is a delivered connection's socket, reclaimed from the
// server (a duplicate: the server still holds its fd), as the move's
// handoff.Socket.
type deliveredSocket struct{ c *net.TCPConn }

func (s deliveredSocket) Block() error { return repair.Block(s.c) }

// Dump dumps the connection and leaves repair mode, still blocked (as
// repair.LeavingSocket: a crash meanwhile closes it with a FIN). held,
// the request bytes the packet path kept from the server, never reached
// the socket: they follow its receive queue, which is empty (the server
// read everything: waitIdle).
func (s deliveredSocket) Dump(held []byte) (*wire.ConnInfo, error) {
	ci, err := repair.Dump(s.c, nil)
	if err != nil {
		return nil, err
	}
	if err := repair.LeaveRepair(s.c); err != nil {
		return nil, err
	}
	ci.RecvQueue = append(ci.RecvQueue, held...)
	return ci, nil
}

// Resume serves the connection here after all; the server's fd never
// changed.
func (s deliveredSocket) Resume() error { return repair.Resume(s.c) }

// CloseSilently takes the socket from the server without a packet: the
// server reads an error and closes its fd.
func (s deliveredSocket) CloseSilently() error { return transplant.TakeBack(s.c) }

// waitIdle waits until the client acknowledged every byte the server sent
// and the server read every byte it was given.
func waitIdle(ctx context.Context, c *net.TCPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	for {
		if err := repair.WaitAcked(ctx, c); err != nil {
			return err
		}
		var inq int
		var ierr error
		if err := rc.Control(func(fd uintptr) { inq, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil {
			return err
		}
		if ierr != nil {
			return fmt.Errorf("SIOCINQ: %w", ierr)
		}
		if inq == 0 {
			// Both again: the server may have answered what it just read.
			if err := repair.WaitAcked(ctx, c); err != nil {
				return err
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the server has %d bytes unread: %w", inq, ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
}

// moveDelivered moves the delivered connection of client on vip, with
// held (the request for another BE, from its first byte), to the BE the
// rules give it. started is called once the connection stands still
// (HANDOFFING). It returns whether the connection left; false with a nil
// error means serve the request here.
func (b *BE) moveDelivered(client, vip netip.AddrPort, held []byte, started func()) (bool, error) {
	targets, stay, err := b.directTargets(held)
	if err != nil || stay {
		return false, err
	}
	sk, err := netif.LookupTCP(vip, client)
	if err != nil {
		return false, fmt.Errorf("find the delivered socket: %w", err)
	}
	conn, err := b.deliver.srv.Reclaim(uint64(sk.Inode))
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), ackedWithin)
	err = waitIdle(ctx, conn)
	cancel()
	if err != nil {
		conn.Close()
		return false, fmt.Errorf("not all answered and acknowledged in time: %w", err)
	}
	started()
	m := newMover(b, b.recv.Leaving)
	sock := deliveredSocket{conn}
	direct := false
	for _, t := range targets {
		direct = direct || len(m.peers.Sessions(t)) > 0
	}
	if direct {
		_, err = m.direct.Leave(context.Background(), sock, held, targets)
	} else {
		err = m.leaver.Leave(context.Background(), sock, held)
	}
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, handoff.ErrCut):
		// Maybe another BE serves it now: a RST rather than two BEs
		// answering one connection.
		conn.Close()
		b.resetDelivered(client)
		return true, err
	case errors.Is(err, handoff.ErrStay):
		conn.Close()
		return false, nil
	}
	conn.Close()
	return false, err
}
