package be

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"tcpha/internal/netaddr"
	"tcpha/relay"
)

// With the FE's [fe] accept = be (issue 14) the FE's packet path places
// new connections on BEs by hash, and a BE accepts them on VIP:port
// itself: its relay reads the first request with the bounds of a later
// one (requesttimeout, maxheader: 408, 431, 400), routes it with the FE's
// rules, and serves it here or moves the connection to the BE it belongs
// to. The listener opens when an FE's cluster frame says accept = be; the
// FE places flows on this BE only once the frame was taken.

// busyAnswer is what a connection gets when maxclients are served already.
const busyAnswer = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

// acceptor is the BE's listener on VIP:port.
type acceptor struct {
	mu    sync.Mutex
	ln    net.Listener
	addr  netip.AddrPort
	perIP map[netip.Addr]int
	// stopped: the BE stops or hands over, and opens no listener again.
	stopped bool
	done    sync.WaitGroup

	accepted, busy, perIPRefused atomic.Int64
}

// acceptOn opens the listener on vip unless it is open; an error is the
// FE's answer to its cluster frame, so that it places nothing here.
func (b *BE) acceptOn(vip netip.AddrPort) error {
	a := &b.acceptor
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.stopped || b.draining.Load():
		return errors.New("this BE is stopping: it accepts no new connections")
	case a.ln != nil && a.addr == vip:
		return nil
	case a.ln != nil:
		return fmt.Errorf("this BE accepts on %v already, not %v", a.addr, vip)
	case vip.Addr() != b.cfg.VAddr:
		return fmt.Errorf("the FE's VIP %v is not this BE's vaddr %v", vip.Addr(), b.cfg.VAddr)
	}
	ln, err := (&net.ListenConfig{}).Listen(context.Background(), "tcp4", vip.String())
	if err != nil {
		// A web server bound to the wildcard address holds the port.
		return fmt.Errorf("accept on %v: %w (the web server must not listen on the wildcard address or the VIP at this port)", vip, err)
	}
	a.ln, a.addr, a.perIP = ln, vip, map[netip.Addr]int{}
	a.done.Go(func() { b.acceptLoop(ln) })
	b.log.Info("accepting new connections on the VIP (accept = be)", "op", "accept", "vip", vip.String())
	return nil
}

// AcceptOn takes a predecessor's VIP:port listener (an upgrade with
// accept = be) and accepts on it at once: the connections in its backlog
// are this agent's.
func (b *BE) AcceptOn(ln net.Listener) {
	a := &b.acceptor
	a.mu.Lock()
	defer a.mu.Unlock()
	a.ln, a.addr, a.perIP = ln, netaddr.AddrPort(ln.Addr()), map[netip.Addr]int{}
	a.done.Go(func() { b.acceptLoop(ln) })
	b.log.Info("accepting new connections on the VIP's inherited listener (accept = be)", "op", "accept", "vip", a.addr.String())
}

// VIPListener is the listener on VIP:port, or nil.
func (b *BE) VIPListener() net.Listener {
	a := &b.acceptor
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ln
}

// pauseAccepting stops accepting for good but keeps the listener open, for
// a successor that takes it over (HandOver): a connection that arrives
// meanwhile waits in the backlog. Release closes this agent's copy.
func (b *BE) pauseAccepting() {
	a := &b.acceptor
	a.mu.Lock()
	a.stopped = true
	if tl, ok := a.ln.(*net.TCPListener); ok {
		tl.SetDeadline(time.Now())
	}
	a.mu.Unlock()
	a.done.Wait()
}

// stopAccepting closes the listener for good and waits for its loop.
func (b *BE) stopAccepting() {
	a := &b.acceptor
	a.mu.Lock()
	a.stopped = true
	if a.ln != nil {
		a.ln.Close()
	}
	a.mu.Unlock()
	a.done.Wait()
}

// acceptLoop accepts until ln is closed.
func (b *BE) acceptLoop(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) {
			return // closed, or paused for a successor
		}
		if err != nil {
			// EMFILE and the like: the connection waits in the backlog.
			b.log.Warn("accept on the VIP", "op", "accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		b.admitConn(c.(*net.TCPConn))
	}
}

// admitConn serves c within the caps: maxconnperip connections from one
// client address (beyond it c is closed), maxclients in all (beyond it a
// 503).
func (b *BE) admitConn(c *net.TCPConn) {
	a := &b.acceptor
	client := netaddr.AddrPort(c.RemoteAddr()).Addr()
	a.mu.Lock()
	over := b.cfg.MaxConnPerIP > 0 && a.perIP[client] >= b.cfg.MaxConnPerIP
	if !over {
		a.perIP[client]++
	}
	a.mu.Unlock()
	if over {
		a.perIPRefused.Add(1)
		c.Close()
		return
	}
	left := func() {
		a.mu.Lock()
		if a.perIP[client]--; a.perIP[client] <= 0 {
			delete(a.perIP, client)
		}
		a.mu.Unlock()
	}
	if b.relay.Active() >= b.cfg.MaxClients {
		a.busy.Add(1)
		left()
		go func() {
			c.SetWriteDeadline(time.Now().Add(time.Second))
			c.Write([]byte(busyAnswer))
			relay.CloseGracefully(c, time.Second)
			c.Close()
		}()
		return
	}
	a.accepted.Add(1)
	b.relay.ServeAccepted(c, left)
}
