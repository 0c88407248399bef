// Package relay is the BE's per-connection session: it carries a handed-off
// client connection to the local web server and back (seed 4.2.3,
// "connection relay", which put the rebuilt socket in the web server's
// accept queue; from user space the BE relays instead).
package relay

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
)

// Pipe copies both ways between a client connection and a server connection
// until both directions end, passing half-closes on. Between two
// *net.TCPConn io.Copy uses splice(2), so the bytes stay in the kernel (the
// seed's zero-copy relay, seed 4.2.2).
func Pipe(client, server *net.TCPConn) { pipe(client, server, nil) }

// pipe is Pipe, which a handover can pause: when handing reports true, a
// direction whose read fails on the deadline the handover set stops there,
// having lost nothing (io.Copy writes all it read before it reads again,
// and so does its splice loop: it moves all it drained into the pipe out
// before draining more). pipe then tells that it paused, and leaves both
// sockets open for a successor to pipe again; a half-close already passed
// on stays passed (the next read of that side is EOF again).
func pipe(client, server *net.TCPConn, handing func() bool) (paused bool) {
	var wg sync.WaitGroup
	var stopped, reset atomic.Bool
	one := func(dst, src *net.TCPConn) {
		defer wg.Done()
		_, err := io.Copy(dst, src)
		switch {
		case err == nil:
			dst.CloseWrite()
		case handing != nil && handing() && errors.Is(err, os.ErrDeadlineExceeded):
			stopped.Store(true)
		default:
			// A reset on one side ends both.
			reset.Store(true)
			client.SetLinger(0)
			client.Close()
			server.Close()
		}
	}
	wg.Add(2)
	go one(server, client)
	go one(client, server)
	wg.Wait()
	if stopped.Load() && !reset.Load() {
		return true
	}
	client.Close()
	server.Close()
	return false
}

// Tracker counts the relays running, so a stopping BE can wait for them.
type Tracker struct {
	// Spawn runs a relay on its own goroutine; nil: a new goroutine.
	Spawn  func(func())
	mu     sync.Mutex
	cond   *sync.Cond
	active int
}

// Go runs fn as a counted relay.
func (t *Tracker) Go(fn func()) {
	t.mu.Lock()
	t.active++
	t.mu.Unlock()
	run := func() {
		defer t.done()
		fn()
	}
	if t.Spawn != nil {
		t.Spawn(run)
	} else {
		go run()
	}
}

func (t *Tracker) done() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.active--
	if t.cond != nil {
		t.cond.Broadcast()
	}
}

// Active returns how many relays run.
func (t *Tracker) Active() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.active
}

// Wait returns when no relay runs.
func (t *Tracker) Wait() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cond == nil {
		t.cond = sync.NewCond(&t.mu)
	}
	for t.active > 0 {
		t.cond.Wait()
	}
}
