package be

// The BE's packet path for connections the web server owns (`[be] deliver
// = socket` under an FE with phttp = multi): the seed's BH (4.8.3). The
// agent no longer reads such a connection's later requests, the web
// server does; so the BE's table (nft.Delivered) queues their client
// segments with payload, and queue.Stream says how much of each the server
// may have. FIN and RST move the connection to TIME_WAIT. A request for
// another BE is held (WILLHANDOFF) while bhmove.go moves the connection
// there (HANDOFFING, HANDOFFED); a move that fails serves it here
// (WILLHANDOFF --handoff-failed--> ESTABLISHED, counted not_moved).
// This file is the decisions, over the flowSet interface, tested without
// root (bh_test.go); bhwire.go is the kernel side and the wiring.

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"tcpha/handoff/conntab"
	"tcpha/handoff/wire"
	"tcpha/phttp"
	"tcpha/queue"
	"tcpha/relay"
)

// Reasons of the BE's packet path besides queue.Stream's.
const (
	// reasonStayed: a request for another BE served here, since moving a
	// delivered connection is not built (counted once per request).
	reasonStayed queue.Reason = "stayed"
	// reasonAbandoned: a flow whose bytes kept coming after a gap was let
	// go (its bytes reached the server unjudged: the queue was bypassed
	// while the agent was away); the server serves it to the end.
	reasonAbandoned queue.Reason = "abandoned"
	reasonClose     queue.Reason = "close" // a FIN or RST: TIME_WAIT
	// reasonRelayed: a connection taken from the server for the relay,
	// since no BE took its request (counted once per connection).
	reasonRelayed queue.Reason = "relayed"
	// reasonHandoffed: a packet of a connection moved away, still on its
	// way here: dropped.
	reasonHandoffed queue.Reason = "handoffed"
)

// abandonAfter is how many segments in a row may come after a gap before
// a flow is let go: a lost segment is retransmitted within a few, while a
// gap that never fills means the server got bytes the agent never saw.
const abandonAfter = 64

// flowSet adds and removes elements of the BE's @delivered set.
type flowSet interface {
	Add(flow netip.AddrPort) error
	Remove(flow netip.AddrPort) error
}

// bhConn is one delivered connection the packet path follows.
type bhConn struct {
	s          *queue.Stream
	vip        netip.AddrPort
	state      conntab.State
	since      time.Time
	seen       time.Time // its last packet
	until      time.Time // TIME_WAIT's end
	requests   int
	outOfOrder int
}

// bh follows delivered connections. Its judge runs on the NFQUEUE
// reader's goroutine and never blocks on the kernel: set removals go to
// a goroutine of their own.
type bh struct {
	log      *slog.Logger
	maxHead  int
	timeWait time.Duration
	rstWait  time.Duration
	idle     time.Duration
	here     queue.Here
	set      flowSet
	now      func() time.Time
	// mover, if set, moves a delivered connection with the request held
	// for another BE (be/bhmove.go); true: it left.
	mover func(client, vip netip.AddrPort, held []byte, started func()) (moveOutcome, error)
	// moved and notMoved count the moves that left and those served here.
	moved, notMoved atomic.Int64
	// alive tells whether the server still has a socket for client on
	// vip (sock_diag); nil: never.
	alive  func(vip, client netip.AddrPort) bool
	metric *prometheus.CounterVec

	mu     sync.Mutex
	conns  map[netip.AddrPort]*bhConn
	counts map[queue.Reason]int64
	gone   chan netip.AddrPort // flows whose elements go
}

func newBH(log *slog.Logger, maxHead int, set flowSet, here queue.Here) *bh {
	// TIME_WAIT on this BE only shows the close (the kernel keeps its
	// own): its row and element go soon.
	return &bh{log: log, maxHead: maxHead, timeWait: 2 * time.Second, rstWait: time.Second,
		idle: 15 * time.Minute, here: here, set: set, now: time.Now,
		conns: map[netip.AddrPort]*bhConn{}, counts: map[queue.Reason]int64{}, gone: make(chan netip.AddrPort, 1024)}
}

// track starts following ci's connection, staged on the server's socket:
// its element is in @delivered before the BE acks the offer, so that no
// client segment reaches the server unjudged. A TLS connection is not
// followed (its bytes cannot be read).
func (p *bh) track(ci *wire.ConnInfo) error {
	if relay.IsTLS(ci.RecvQueue) {
		return nil
	}
	if p.pipelined(ci.RecvQueue) {
		return errPipelined
	}
	if err := p.set.Add(ci.Client); err != nil {
		return fmt.Errorf("follow %v's later requests: %w", ci.Client, err)
	}
	now := p.now()
	p.mu.Lock()
	p.conns[ci.Client] = &bhConn{s: queue.NewStream(ci.RcvSeq, ci.RecvQueue, p.maxHead), vip: ci.VIP, since: now, seen: now}
	p.mu.Unlock()
	return nil
}

// errPipelined: the handoff's bytes hold, after the first request, one
// for another BE or the start of one.
var errPipelined = errors.New("pipelined requests not all this BE's")

// pipelined tells whether recv, the handoff's bytes, holds more than its
// first request and that is not all this BE's (or not whole): the server
// would read the whole pipeline, so the relay, which routes each request,
// takes the connection instead (the relay's rule for pipelines).
func (p *bh) pipelined(recv []byte) bool {
	first := true
	s := queue.NewStream(0, nil, p.maxHead)
	keep, _ := s.Segment(0, recv, func(h *phttp.Head) bool {
		if first {
			first = false
			return true
		}
		return p.here(h)
	})
	return keep < len(recv)
}

// delivered: the FE committed, the server owns the connection
// (ESTABLISHED on this BE).
func (p *bh) delivered(client netip.AddrPort) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[client]; ok {
		c.state, _, _ = conntab.Step(conntab.BE, conntab.Closed, conntab.EvRestored)
	}
}

// untrack stops following client's connection (the handoff failed, or the
// connection fell back to the relay).
func (p *bh) untrack(client netip.AddrPort) {
	p.mu.Lock()
	_, ok := p.conns[client]
	delete(p.conns, client)
	p.mu.Unlock()
	if ok {
		p.drop(client)
	}
}

// drop has client's element removed off the reader's goroutine.
func (p *bh) drop(client netip.AddrPort) {
	select {
	case p.gone <- client:
	default:
		// The set's timeout removes it (nft.DeliveredParams.IdleTimeout).
		p.log.Debug("delivered flow left to expire", "op", "bh", "client", client.String())
	}
}

// removeLoop removes the elements of flows that ended, until stop.
func (p *bh) removeLoop(stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case flow := <-p.gone:
			if err := p.set.Remove(flow); err != nil {
				p.log.Debug("delivered flow not removed", "op", "bh", "client", flow.String(), "err", err)
			}
		}
	}
}

func (p *bh) count(r queue.Reason) {
	p.counts[r]++
	if p.metric != nil {
		p.metric.WithLabelValues(string(r)).Inc()
	}
}

// judge decides one queued packet: accept it, drop it, or accept it cut
// (repl, the new packet).
func (p *bh) judge(b []byte) (queue.Verdict, []byte) {
	v, repl, _ := p.judgeReason(b)
	return v, repl
}

func (p *bh) judgeReason(b []byte) (queue.Verdict, []byte, queue.Reason) {
	seg, err := queue.ParseSegment(b)
	p.mu.Lock()
	defer p.mu.Unlock()
	if err != nil {
		// Not ours to judge: the kernel has its own checks.
		p.count(queue.ReasonMalformed)
		return queue.Accept, nil, queue.ReasonMalformed
	}
	c, ok := p.conns[seg.Src]
	if !ok {
		p.count(queue.ReasonNoFlow)
		return queue.Accept, nil, queue.ReasonNoFlow
	}
	now := p.now()
	c.seen = now
	if c.state == conntab.Handoffed {
		// The connection lives on another BE now.
		p.count(reasonHandoffed)
		return queue.Drop, nil, reasonHandoffed
	}
	keep, r := len(seg.Data), queue.ReasonRetransmit
	if len(seg.Data) > 0 && c.state != conntab.TimeWait {
		keep, r = p.segment(c, seg)
		if r == queue.ReasonOutOfOrder {
			if c.outOfOrder++; c.outOfOrder >= abandonAfter {
				delete(p.conns, seg.Src)
				p.drop(seg.Src)
				p.count(reasonAbandoned)
				p.log.Warn("delivered connection no longer followed: its bytes went by unjudged", "op", "bh",
					"client", seg.Src.String(), "state", c.state.String())
				return queue.Accept, nil, reasonAbandoned
			}
		} else {
			c.outOfOrder = 0
		}
	}
	if (seg.FIN || seg.RST) && keep == len(seg.Data) {
		ev := conntab.EvFIN
		until := now.Add(p.timeWait)
		if seg.RST {
			ev, until = conntab.EvRST, now.Add(p.rstWait)
		}
		if to, _, err := conntab.Step(conntab.BE, c.state, ev); err == nil {
			if to == conntab.TimeWait && c.state != conntab.TimeWait {
				c.until = until
			}
			c.state = to
		}
		p.count(reasonClose)
		return queue.Accept, nil, reasonClose
	}
	p.count(r)
	switch {
	case keep == len(seg.Data):
		return queue.Accept, nil, r
	case keep == 0:
		return queue.Drop, nil, r
	}
	cut, err := seg.Truncate(b, keep)
	if err != nil {
		return queue.Drop, nil, queue.ReasonMalformed
	}
	return queue.Accept, cut, r
}

// segment runs seg's payload through c's stream, serving here a request
// for another BE (the move is not built).
func (p *bh) segment(c *bhConn, seg queue.Segment) (int, queue.Reason) {
	heads := 0
	here := func(h *phttp.Head) bool {
		heads++
		return p.here(h)
	}
	keep, r := c.s.Segment(seg.Seq, seg.Data, here)
	c.requests += heads
	if !c.moving() || c.state != conntab.Established {
		return keep, r
	}
	// WILLHANDOFF: the request is held while the connection moves.
	if to, _, err := conntab.Step(conntab.BE, c.state, conntab.EvReschedule); err == nil {
		c.state = to
	}
	if p.mover != nil {
		_, held, _ := c.s.Moving()
		go p.move(seg.Src, c, append([]byte(nil), held...))
		return keep, r
	}
	// No move: the move fails at once, and the request is served here.
	p.stay(c)
	return c.s.Segment(seg.Seq, seg.Data, p.here)
}

// stay serves a held request here (the move failed, or there is none):
// WILLHANDOFF or HANDOFFING --handoff-failed--> ESTABLISHED.
func (p *bh) stay(c *bhConn) {
	if to, _, err := conntab.Step(conntab.BE, c.state, conntab.EvHandoffFailed); err == nil {
		c.state = to
	}
	c.s.Stay()
	p.count(reasonStayed)
}

// move moves c, the connection of client, with held, off the reader's
// goroutine; the request is served here if it does not leave.
func (p *bh) move(client netip.AddrPort, c *bhConn, held []byte) {
	started := func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		if to, _, err := conntab.Step(conntab.BE, c.state, conntab.EvHandoffStart); err == nil {
			c.state = to
		}
	}
	out, err := p.mover(client, c.vip, held, started)
	p.mu.Lock()
	defer p.mu.Unlock()
	switch out {
	case outStay:
		p.notMoved.Add(1)
		p.log.Info("delivered connection not moved; its request is served here", "op", "migrate", "client", client.String(), "err", err)
		if p.conns[client] == c && c.state != conntab.TimeWait {
			p.stay(c)
		}
		return
	case outMoved:
		p.moved.Add(1)
		if p.conns[client] == c {
			// HANDOFFED until the row's time is up: the flow's packets
			// still on their way here are dropped (the client sends them
			// again, to the new BE), not answered by this BE's stack with
			// a RST.
			if to, _, err := conntab.Step(conntab.BE, c.state, conntab.EvHandoffAcked); err == nil {
				c.state = to
			}
			if c.state == conntab.Handoffed {
				c.until = p.now().Add(p.timeWait)
				return
			}
		}
	case outRelayed:
		p.count(reasonRelayed)
		p.log.Info("delivered connection taken back for the relay: no BE took its request", "op", "migrate", "client", client.String(), "err", err)
	case outCut:
		p.moved.Add(1)
		p.log.Warn("delivered connection reset: its move's outcome is unknown", "op", "migrate", "client", client.String(), "err", err)
	}
	if p.conns[client] == c {
		delete(p.conns, client)
		p.drop(client)
	}
}

// reap ends TIME_WAITs that ran out, and follows no longer a connection
// that went quiet past the idle bound and whose socket is gone (a close
// the agent missed). A quiet connection whose socket lives goes on: a long
// download's client sends only ACKs, which are not queued.
func (p *bh) reap() {
	now := p.now()
	p.mu.Lock()
	var done []netip.AddrPort
	var quiet []bhKey
	for flow, c := range p.conns {
		switch {
		case (c.state == conntab.TimeWait || c.state == conntab.Handoffed) && now.After(c.until):
			done = append(done, flow)
			delete(p.conns, flow)
		case now.Sub(c.seen) > p.idle:
			quiet = append(quiet, bhKey{c.vip, flow})
		}
	}
	p.mu.Unlock()
	for _, k := range quiet {
		alive := p.alive != nil && p.alive(k.vip, k.client)
		p.mu.Lock()
		if c, ok := p.conns[k.client]; ok && now.Sub(c.seen) > p.idle {
			if alive {
				c.seen = now
			} else {
				delete(p.conns, k.client)
				done = append(done, k.client)
			}
		}
		p.mu.Unlock()
	}
	for _, f := range done {
		p.drop(f)
	}
}

type bhKey struct{ vip, client netip.AddrPort }

// bhRow is a delivered connection as `tcphactl conns` shows it.
type bhRow struct {
	Client   netip.AddrPort
	State    conntab.State
	Since    time.Time
	Requests int
}

func (p *bh) rows() []bhRow {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]bhRow, 0, len(p.conns))
	for f, c := range p.conns {
		if c.state == conntab.Closed {
			continue // staged, not committed yet
		}
		out = append(out, bhRow{f, c.state, c.since, c.requests})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Client.Compare(out[j].Client) < 0 })
	return out
}

// Counts returns the packets judged, by reason.
func (p *bh) Counts() map[queue.Reason]int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[queue.Reason]int64, len(p.counts))
	for k, v := range p.counts {
		out[k] = v
	}
	return out
}

// forget stops following every connection (their elements are gone).
func (p *bh) forget() {
	p.mu.Lock()
	defer p.mu.Unlock()
	clear(p.conns)
}

func (c *bhConn) moving() bool {
	h, _, _ := c.s.Moving()
	return h != nil
}
