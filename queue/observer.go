package queue

import (
	"net/netip"
	"sort"
	"sync"
	"time"

	"tcpha/handoff/conntab"
)

// Verdict is what the kernel does with a queued packet.
type Verdict uint8

const (
	Drop   Verdict = iota // NF_DROP
	Accept                // NF_ACCEPT
)

func (v Verdict) String() string {
	if v == Accept {
		return "accept"
	}
	return "drop"
}

// Reason says why a queued packet got its verdict. Each is a stable metric
// label (`tcphactl status`).
type Reason string

const (
	// ReasonForwarded: the rule already sent a copy to the BE before
	// queueing; the queued original is only an observation.
	ReasonForwarded Reason = "forwarded-copy"
	ReasonMalformed Reason = "malformed"
	ReasonNotVIP    Reason = "not-for-vip"
	ReasonIllegal   Reason = "illegal-event"
)

// Observer turns the FE's queued packets into connection events. The FE's
// table queues the first FIN or RST of a HANDOFFED flow after `dup`-ing it
// to the BE, so the connection moves to TIME_WAIT without the agent ever
// holding a packet back: every verdict is Drop, and nothing is lost when
// the agent is slow, restarting or dead (the queue then drops it).
type Observer struct {
	Table *conntab.Table
	VIP   netip.AddrPort
	// TLSPort is the VIP's TLS port, whose flows the FE's table queues
	// like VIP's (0: none).
	TLSPort  uint16
	TimeWait time.Duration // after FIN
	RSTWait  time.Duration // after RST: the connection is already gone
	Now      func() time.Time
	// Closed, if set, hears of each packet that left a flow in TIME_WAIT
	// (the FE's flow sync tells its peer). It runs on the reader's
	// goroutine and must not block.
	Closed func(flow netip.AddrPort)

	mu     sync.Mutex
	total  int64
	counts map[string]int64
}

// Handle decides one queued packet. It never blocks: it is called on the
// NFQUEUE reader's goroutine.
func (o *Observer) Handle(b []byte) (Verdict, Reason) {
	o.mu.Lock()
	o.total++
	o.mu.Unlock()
	p, err := Parse(b)
	if err != nil {
		o.count("reason", string(ReasonMalformed))
		return Drop, ReasonMalformed
	}
	if p.Dst != o.VIP && (o.TLSPort == 0 || p.Dst != netip.AddrPortFrom(o.VIP.Addr(), o.TLSPort)) {
		o.count("reason", string(ReasonNotVIP))
		return Drop, ReasonNotVIP
	}
	ev := conntab.PacketEvent(p.SYN, p.FIN, p.RST, p.Payload)
	now := o.Now()
	until := now.Add(o.TimeWait)
	if ev == conntab.EvRST {
		until = now.Add(o.RSTWait)
	}
	o.count("event", ev.String())
	state, _, err := o.Table.Observe(p.Src, ev, now, until)
	if err != nil {
		o.count("reason", string(ReasonIllegal))
		return Drop, ReasonIllegal
	}
	if state == conntab.TimeWait && o.Closed != nil {
		o.Closed(p.Src)
	}
	o.count("reason", string(ReasonForwarded))
	return Drop, ReasonForwarded
}

func (o *Observer) count(kind, label string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.counts == nil {
		o.counts = map[string]int64{}
	}
	o.counts[kind+"="+label]++
}

// Counts returns the counters as sorted "kind=label count" pairs.
func (o *Observer) Counts() []Count {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]Count, 0, len(o.counts))
	for k, v := range o.counts {
		out = append(out, Count{k, v})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Label < out[j].Label })
	return out
}

// Total returns how many packets were queued to the observer.
func (o *Observer) Total() int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.total
}

// Count is one counter.
type Count struct {
	Label string
	N     int64
}
