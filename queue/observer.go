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

	mu      sync.Mutex
	total   int64
	packets map[PacketKey]int64
}

// Handle decides one queued packet. It never blocks: it is called on the
// NFQUEUE reader's goroutine.
func (o *Observer) Handle(b []byte) (Verdict, Reason) {
	ev, r := o.handle(b)
	o.mu.Lock()
	defer o.mu.Unlock()
	o.total++
	if o.packets == nil {
		o.packets = map[PacketKey]int64{}
	}
	o.packets[PacketKey{ev, r}]++
	return Drop, r
}

// handle judges one packet: the event it carried ("" if it never reached
// the table) and the reason for its verdict, always Drop.
func (o *Observer) handle(b []byte) (event string, r Reason) {
	p, err := Parse(b)
	if err != nil {
		return "", ReasonMalformed
	}
	if p.Dst != o.VIP && (o.TLSPort == 0 || p.Dst != netip.AddrPortFrom(o.VIP.Addr(), o.TLSPort)) {
		return "", ReasonNotVIP
	}
	ev := conntab.PacketEvent(p.SYN, p.FIN, p.RST, p.Payload)
	now := o.Now()
	until := now.Add(o.TimeWait)
	if ev == conntab.EvRST {
		until = now.Add(o.RSTWait)
	}
	state, _, err := o.Table.Observe(p.Src, ev, now, until)
	if err != nil {
		return ev.String(), ReasonIllegal
	}
	if state == conntab.TimeWait && o.Closed != nil {
		o.Closed(p.Src)
	}
	return ev.String(), ReasonForwarded
}

// PacketKey is what one queued packet was: the event it carried ("" when
// it was malformed or not for the VIP) and the reason for its verdict.
type PacketKey struct {
	Event  string
	Reason Reason
}

// PacketCount is how many packets had one PacketKey.
type PacketCount struct {
	PacketKey
	N int64
}

// Packets returns the packets by event and reason, sorted: each packet is
// in exactly one, so they add up to Total (tcpha_nfqueue_packets_total).
func (o *Observer) Packets() []PacketCount {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]PacketCount, 0, len(o.packets))
	for k, v := range o.packets {
		out = append(out, PacketCount{k, v})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Event != out[j].Event {
			return out[i].Event < out[j].Event
		}
		return out[i].Reason < out[j].Reason
	})
	return out
}

// Counts returns the counters as sorted "kind=label count" pairs: a packet
// with an event is in two of them (event=fin and its reason), so they are
// a breakdown for `tcphactl status`, not a sum.
func (o *Observer) Counts() []Count {
	counts := map[string]int64{}
	for _, p := range o.Packets() {
		if p.Event != "" {
			counts["event="+p.Event] += p.N
		}
		counts["reason="+string(p.Reason)] += p.N
	}
	out := make([]Count, 0, len(counts))
	for k, v := range counts {
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
