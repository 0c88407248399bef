package handoff

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"tcpha/handoff/wire"
)

// Rebuilder rebuilds handed-off sockets on the BE (repair.Restore and
// repair.CloseSilently in production).
type Rebuilder interface {
	Restore(ci *wire.ConnInfo) (*net.TCPConn, error)
	CloseSilently(c *net.TCPConn) error
}

// Receiver is the BE's side of the handoff (the seed's SHR): it serves the
// FE's control connections, rebuilds each offered connection and, once the
// FE commits, relays it to the local web server.
type Receiver struct {
	Codec         wire.Codec
	VIP           netip.Addr
	Rebuilder     Rebuilder
	Upstream      func(ctx context.Context) (*net.TCPConn, error)
	CommitTimeout time.Duration
	MaxClients    int
	Log           *slog.Logger

	served  atomic.Int64
	refused atomic.Int64
	// relays counts running relays; Wait may start before the first one,
	// which a WaitGroup does not allow.
	relayMu   sync.Mutex
	relayDone *sync.Cond
	relays    int
	ctlMu     sync.Mutex
	ctlConns  map[net.Conn]struct{}
}

// Stats are the receiver's counters.
type Stats struct {
	Active, Served, Refused int64
}

// Stats returns the receiver's counters.
func (r *Receiver) Stats() Stats {
	r.relayMu.Lock()
	defer r.relayMu.Unlock()
	return Stats{Active: int64(r.relays), Served: r.served.Load(), Refused: r.refused.Load()}
}

// Serve accepts control connections on ln until ctx is done, then closes
// them. Relays already running go on until their connections end; Wait
// waits for them.
func (r *Receiver) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		r.ctlMu.Lock()
		for c := range r.ctlConns {
			c.Close()
		}
		r.ctlMu.Unlock()
	})
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept control connection: %w", err)
		}
		r.track(c, true)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer r.track(c, false)
			r.serveControl(ctx, c)
		}()
	}
}

// Wait waits for running relays to end.
func (r *Receiver) Wait() {
	r.relayMu.Lock()
	defer r.relayMu.Unlock()
	for r.relays > 0 {
		r.cond().Wait()
	}
}

func (r *Receiver) cond() *sync.Cond {
	if r.relayDone == nil {
		r.relayDone = sync.NewCond(&r.relayMu)
	}
	return r.relayDone
}

// startRelay counts a relay in unless maxclients are running.
func (r *Receiver) startRelay() bool {
	r.relayMu.Lock()
	defer r.relayMu.Unlock()
	if r.relays >= r.MaxClients {
		return false
	}
	r.relays++
	return true
}

func (r *Receiver) endRelay() {
	r.relayMu.Lock()
	defer r.relayMu.Unlock()
	r.relays--
	r.cond().Broadcast()
}

func (r *Receiver) track(c net.Conn, add bool) {
	r.ctlMu.Lock()
	defer r.ctlMu.Unlock()
	if r.ctlConns == nil {
		r.ctlConns = map[net.Conn]struct{}{}
	}
	if add {
		r.ctlConns[c] = struct{}{}
	} else {
		delete(r.ctlConns, c)
		c.Close()
	}
}

func (r *Receiver) serveControl(ctx context.Context, c net.Conn) {
	log := r.Log.With("fe", c.RemoteAddr().String())
	for {
		f, err := r.Codec.Read(c)
		if err != nil {
			if !errors.Is(err, io.EOF) && ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				// A frame that fails authentication is dropped with its
				// connection: after it the stream cannot be trusted.
				log.Warn("control frame dropped", "op", "control", "err", err)
			}
			return
		}
		switch f.Type {
		case wire.TypePing:
			err = r.Codec.Write(c, wire.Frame{Type: wire.TypePong, ConnMagic: f.ConnMagic})
		case wire.TypeRequest:
			err = r.handoff(ctx, c, f, log)
		default:
			// Commit or abort without an outstanding handoff: its handoff
			// already timed out here and the socket is gone.
			log.Warn("unexpected control frame", "op", "control", "type", f.Type.String(), "conn_magic", f.ConnMagic)
		}
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("control connection failed", "op", "control", "err", err)
			}
			return
		}
	}
}

// handoff serves one handoff request. It returns an error only when the
// control connection is unusable.
func (r *Receiver) handoff(ctx context.Context, c net.Conn, f wire.Frame, log *slog.Logger) error {
	ack := func(res wire.Result, why error) error {
		a := wire.Ack{Result: res}
		if why != nil {
			a.Reason = why.Error()
			r.refused.Add(1)
		}
		p, _ := a.MarshalBinary()
		return r.Codec.Write(c, wire.Frame{Type: wire.TypeAck, ConnMagic: f.ConnMagic, Payload: p})
	}
	var ci wire.ConnInfo
	if err := ci.UnmarshalBinary(f.Payload); err != nil {
		log.Warn("handoff refused", "op", "restore", "err", err)
		return ack(wire.ResultBadFrame, err)
	}
	log = log.With("client", ci.Client.String())
	if ci.VIP.Addr() != r.VIP {
		err := fmt.Errorf("connection is for %v, this BE serves VIP %v", ci.VIP.Addr(), r.VIP)
		log.Warn("handoff refused", "op", "restore", "err", err)
		return ack(wire.ResultWrongVIP, err)
	}
	// The slot is taken now, so that concurrent offers cannot overshoot.
	if !r.startRelay() {
		err := fmt.Errorf("%d connections already served (maxclients)", r.MaxClients)
		log.Warn("handoff refused", "op", "restore", "err", err)
		return ack(wire.ResultBusy, err)
	}
	relaying := false
	defer func() {
		if !relaying {
			r.endRelay()
		}
	}()
	// Connect upstream first: a BE whose web server is down says so, and
	// the FE tries elsewhere before anything was rebuilt.
	uctx, cancel := context.WithTimeout(ctx, time.Second)
	up, err := r.Upstream(uctx)
	cancel()
	if err != nil {
		log.Warn("handoff refused", "op", "upstream", "err", err)
		return ack(wire.ResultUpstream, err)
	}
	start := time.Now()
	conn, err := r.Rebuilder.Restore(&ci)
	if err != nil {
		up.Close()
		log.Warn("handoff refused", "op", "restore", "err", err)
		return ack(wire.ResultRestore, err)
	}
	if err := ack(wire.ResultOK, nil); err != nil {
		r.drop(conn, up, log)
		return err
	}
	// Serve only once the FE forwards the client's packets here (FACTS.md:
	// serving earlier lost ACKs and FINs).
	c.SetReadDeadline(time.Now().Add(r.CommitTimeout))
	next, err := r.Codec.Read(c)
	c.SetReadDeadline(time.Time{})
	switch {
	case err != nil:
		r.drop(conn, up, log)
		if isTimeout(err) {
			log.Warn("no commit from the FE; connection dropped", "op", "commit", "timeout", r.CommitTimeout)
			return nil
		}
		return err
	case next.Type == wire.TypeAbort && next.ConnMagic == f.ConnMagic:
		log.Info("handoff aborted by the FE", "op", "commit")
		r.drop(conn, up, log)
		return nil
	case next.Type != wire.TypeCommit || next.ConnMagic != f.ConnMagic:
		r.drop(conn, up, log)
		return fmt.Errorf("got %v for conn_magic %d, want commit for %d", next.Type, next.ConnMagic, f.ConnMagic)
	}
	r.served.Add(1)
	log.Debug("connection handed off", "op", "handoff", "restore", time.Since(start))
	relaying = true
	go func() {
		defer r.endRelay()
		Relay(conn, up)
	}()
	return nil
}

func (r *Receiver) drop(conn, up *net.TCPConn, log *slog.Logger) {
	up.Close()
	if err := r.Rebuilder.CloseSilently(conn); err != nil {
		log.Warn("drop rebuilt socket", "op", "restore", "err", err)
	}
}

// Relay copies both ways between a client connection and a server
// connection until both directions end, passing half-closes on. Between two
// *net.TCPConn io.Copy uses splice(2), so the bytes stay in the kernel (the
// seed's zero-copy relay, seed 4.2.2).
func Relay(client, server *net.TCPConn) {
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
