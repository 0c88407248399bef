// Package relay is the BE's per-connection session: it carries a handed-off
// client connection to the local web server and back (seed 4.2.3,
// "connection relay", which put the rebuilt socket in the web server's
// accept queue; from user space the BE relays instead).
package relay

import (
	"io"
	"net"
	"sync"
)

// Pipe copies both ways between a client connection and a server connection
// until both directions end, passing half-closes on. Between two
// *net.TCPConn io.Copy uses splice(2), so the bytes stay in the kernel (the
// seed's zero-copy relay, seed 4.2.2).
func Pipe(client, server *net.TCPConn) {
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst, src *net.TCPConn) {
		defer wg.Done()
		if _, err := io.Copy(dst, src); err != nil {
			// A reset on one side ends both.
			client.SetLinger(0)
			client.Close()
			server.Close()
			return
		}
		dst.CloseWrite()
	}
	go pipe(server, client)
	go pipe(client, server)
	wg.Wait()
	client.Close()
	server.Close()
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
