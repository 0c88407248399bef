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

// moveOutcome is what became of a delivered connection whose request
// was another BE's.
type moveOutcome uint8

const (
	outStay    moveOutcome = iota // still the server's: serve the request here
	outMoved                      // it lives on another BE
	outRelayed                    // taken from the server, and this BE's relay serves it
	outCut                        // reset: the move's outcome is unknown
)

// moveDelivered moves the delivered connection of client on vip, with
// held (the request for another BE, from its first byte), to the BE the
// rules give it. started is called once the connection stands still
// (HANDOFFING). When no BE takes it, the connection is taken from the
// server all the same and given to this BE's relay, which applies the
// relay's rules to the request (fetch it from a named BE's web server, or
// answer 503: never serve another BE's request here, issue 19).
func (b *BE) moveDelivered(client, vip netip.AddrPort, held []byte, started func()) (moveOutcome, error) {
	targets, stay, err := b.directTargets(held)
	if err != nil || stay {
		return outStay, err
	}
	sk, err := netif.LookupTCP(vip, client)
	if err != nil {
		return outStay, fmt.Errorf("find the delivered socket: %w", err)
	}
	conn, err := b.deliver.srv.Reclaim(uint64(sk.Inode))
	if err != nil {
		return outStay, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), ackedWithin)
	err = waitIdle(ctx, conn)
	cancel()
	if err != nil {
		conn.Close()
		return outStay, fmt.Errorf("not all answered and acknowledged in time: %w", err)
	}
	started()
	m := newMover(b, b.recv.Leaving)
	sock := deliveredSocket{conn}
	direct := false
	for _, t := range targets {
		direct = direct || len(m.peers.Sessions(t)) > 0
	}
	switch {
	case len(targets) == 0:
		err = handoff.ErrNoBE
	case direct:
		_, err = m.direct.Leave(context.Background(), sock, held, targets)
	default:
		err = m.leaver.Leave(context.Background(), sock, held)
	}
	switch {
	case err == nil:
		return outMoved, nil
	case errors.Is(err, handoff.ErrCut):
		// Maybe another BE serves it now: a RST rather than two BEs
		// answering one connection.
		conn.Close()
		b.resetDelivered(client)
		return outCut, err
	case errors.Is(err, handoff.ErrStay):
		conn.Close()
		return outStay, nil
	}
	// No BE took it (or none takes connections): the relay's rules.
	if rerr := b.relayDelivered(sock, client, held); rerr != nil {
		conn.Close()
		return outStay, errors.Join(err, rerr)
	}
	return outRelayed, err
}

// relayDelivered takes the connection from the server without a packet
// and rebuilds it here for the relay, with held in its receive queue; the
// relay routes that request as a first one (ServeAccepted).
func (b *BE) relayDelivered(sock deliveredSocket, client netip.AddrPort, held []byte) error {
	if err := sock.Block(); err != nil {
		return err
	}
	ci, err := sock.Dump(held)
	if err != nil {
		return errors.Join(err, sock.Resume())
	}
	// Out of the packet path first: the relay reads every byte itself.
	if b.bh != nil && b.bh.set != nil {
		if err := b.bh.set.Remove(client); err != nil {
			return errors.Join(err, sock.Resume())
		}
	}
	if err := sock.CloseSilently(); err != nil {
		return fmt.Errorf("take the connection from the server: %w", err)
	}
	rb, err := repair.Rebuild(ci)
	if err != nil {
		return fmt.Errorf("rebuild the connection for the relay: %w", err)
	}
	c, err := rb.Activate()
	if err != nil {
		return fmt.Errorf("rebuild the connection for the relay: %w", err)
	}
	b.relay.ServeAccepted(c, nil)
	return nil
}
