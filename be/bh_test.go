package be

import (
	"encoding/binary"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"tcpha/handoff/conntab"
	"tcpha/handoff/wire"
	"tcpha/phttp"
	"tcpha/queue"
)

// fakeSet is @delivered without a kernel.
type fakeSet struct {
	mu    sync.Mutex
	flows map[netip.AddrPort]bool
	log   []string
}

func (s *fakeSet) Add(f netip.AddrPort) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.flows[f] = true
	s.log = append(s.log, "add "+f.String())
	return nil
}

func (s *fakeSet) Remove(f netip.AddrPort) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.flows, f)
	s.log = append(s.log, "remove "+f.String())
	return nil
}

// segment builds the client's IPv4/TCP packet with seq and payload.
func segment(client, vip netip.AddrPort, seq uint32, flags byte, payload string) []byte {
	b := make([]byte, 40+len(payload))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[8], b[9] = 64, 6
	copy(b[12:], client.Addr().AsSlice())
	copy(b[16:], vip.Addr().AsSlice())
	binary.BigEndian.PutUint16(b[20:], client.Port())
	binary.BigEndian.PutUint16(b[22:], vip.Port())
	binary.BigEndian.PutUint32(b[24:], seq)
	b[32], b[33] = 5<<4, flags|0x10
	copy(b[40:], payload)
	return b
}

// The BE's packet path on a delivered connection: its element goes in at
// staging, this BE's requests are let through, one the rules give another
// BE is served here all the same (the move is not built) and counted, a
// split head waits whole, a FIN starts TIME_WAIT, and the reaper takes
// the row and the element away at its end.
func TestBHDeliveredConnection(t *testing.T) {
	set := &fakeSet{flows: map[netip.AddrPort]bool{}}
	now := time.Unix(1000, 0)
	p := newBH(discard(), 8192, set, func(h *phttp.Head) bool { return !strings.HasPrefix(h.Path, "/img/") })
	p.now = func() time.Time { return now }
	client, vip := netip.MustParseAddrPort("10.0.0.10:40000"), netip.MustParseAddrPort("10.0.0.100:80")
	first := "GET / HTTP/1.1\r\nHost: a\r\n\r\n"
	ci := &wire.ConnInfo{Client: client, VIP: vip, RcvSeq: 5000, RecvQueue: []byte(first)}
	if err := p.track(ci); err != nil {
		t.Fatal(err)
	}
	if !set.flows[client] {
		t.Fatal("no element in @delivered at staging")
	}
	if len(p.rows()) != 0 {
		t.Error("a staged connection shows before its commit")
	}
	p.delivered(client)
	seq := ci.ConnMagic()
	send := func(flags byte, payload string) (queue.Verdict, []byte, queue.Reason) {
		v, repl, r := p.judgeReason(segment(client, vip, seq, flags, payload))
		return v, repl, r
	}
	get := "GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n"
	if v, repl, r := send(0, get); v != queue.Accept || repl != nil || r != queue.ReasonHere {
		t.Errorf("this BE's request: %v %v %v", v, repl != nil, r)
	}
	seq += uint32(len(get))
	img := "GET /img/a.jpg HTTP/1.1\r\nHost: a\r\n\r\n"
	if v, _, r := send(0, img[:8]); v != queue.Drop || r != queue.ReasonHeadSplit {
		t.Errorf("a head's first 8 bytes: %v %v", v, r)
	}
	seq += 8
	if v, _, r := send(0, img[8:]); v != queue.Accept || r != queue.ReasonRetransmit {
		// Served here after all: the move is not built.
		t.Errorf("another BE's request: %v %v", v, r)
	}
	if c := p.Counts(); c[reasonStayed] != 1 {
		t.Errorf("counts %v: want one request stayed", c)
	}
	rows := p.rows()
	if len(rows) != 1 || rows[0].State != conntab.Established || rows[0].Requests != 2 {
		t.Errorf("rows %+v: want one ESTABLISHED with 2 requests", rows)
	}
	seq += uint32(len(img) - 8)
	if v, _, r := send(0x01, ""); v != queue.Accept || r != reasonClose {
		t.Errorf("FIN: %v %v", v, r)
	}
	if rows := p.rows(); len(rows) != 1 || rows[0].State != conntab.TimeWait {
		t.Errorf("rows after FIN %+v", rows)
	}
	now = now.Add(11 * time.Second)
	p.reap()
	if len(p.rows()) != 0 {
		t.Error("TIME_WAIT did not end")
	}
	if got := <-p.gone; got != client {
		t.Errorf("removal of %v queued, want %v", got, client)
	}
	if v, _, r := p.judgeReason(segment(client, vip, seq, 0, "x")); v != queue.Accept || r != queue.ReasonNoFlow {
		t.Errorf("a packet of a flow no longer followed: %v %v", v, r)
	}
}

// A pipeline of this BE's request and another's is cut after this BE's,
// and the rest is then served here (the move is not built).
func TestBHPipelineCut(t *testing.T) {
	set := &fakeSet{flows: map[netip.AddrPort]bool{}}
	p := newBH(discard(), 8192, set, func(h *phttp.Head) bool { return h.Path != "/other" })
	client, vip := netip.MustParseAddrPort("10.0.0.10:40001"), netip.MustParseAddrPort("10.0.0.100:80")
	ci := &wire.ConnInfo{Client: client, VIP: vip, RcvSeq: 1, RecvQueue: []byte("GET / HTTP/1.1\r\n\r\n")}
	p.track(ci)
	p.delivered(client)
	v, repl, r := p.judgeReason(segment(client, vip, ci.ConnMagic(), 0, "GET /a HTTP/1.1\r\n\r\nGET /other HTTP/1.1\r\n\r\n"))
	// Both heads come in one segment: the second is held, then served here
	// at once, so the whole segment goes through.
	if v != queue.Accept || repl != nil || r != queue.ReasonRetransmit {
		t.Errorf("pipeline: %v cut=%v %v", v, repl != nil, r)
	}
	if p.Counts()[reasonStayed] != 1 {
		t.Errorf("counts %v", p.Counts())
	}
}

// A flow whose bytes went by unjudged (the queue bypassed while the agent
// was away) is let go after abandonAfter segments past the gap.
func TestBHAbandonsAGap(t *testing.T) {
	set := &fakeSet{flows: map[netip.AddrPort]bool{}}
	p := newBH(discard(), 8192, set, func(*phttp.Head) bool { return true })
	client, vip := netip.MustParseAddrPort("10.0.0.10:40002"), netip.MustParseAddrPort("10.0.0.100:80")
	ci := &wire.ConnInfo{Client: client, VIP: vip, RcvSeq: 1, RecvQueue: []byte("GET / HTTP/1.1\r\n\r\n")}
	p.track(ci)
	p.delivered(client)
	var last queue.Reason
	var v queue.Verdict
	for i := range abandonAfter {
		v, _, last = p.judgeReason(segment(client, vip, ci.ConnMagic()+1000+uint32(i), 0, "x"))
	}
	if v != queue.Accept || last != reasonAbandoned || len(p.rows()) != 0 {
		t.Errorf("after %d segments past a gap: %v %v, rows %v", abandonAfter, v, last, p.rows())
	}
	if got := <-p.gone; got != client {
		t.Errorf("removal of %v, want %v", got, client)
	}
	if !slices.Contains(set.log, "add "+client.String()) {
		t.Errorf("set log %v", set.log)
	}
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// A connection quiet past the idle bound is still followed while its
// socket lives (a long download's client sends only ACKs, which are not
// queued), and let go once it is gone.
func TestBHReapQuiet(t *testing.T) {
	set := &fakeSet{flows: map[netip.AddrPort]bool{}}
	now := time.Unix(1000, 0)
	p := newBH(discard(), 8192, set, func(*phttp.Head) bool { return true })
	p.now = func() time.Time { return now }
	p.idle = time.Minute
	alive := true
	p.alive = func(vip, client netip.AddrPort) bool { return alive }
	client, vip := netip.MustParseAddrPort("10.0.0.10:40003"), netip.MustParseAddrPort("10.0.0.100:80")
	p.track(&wire.ConnInfo{Client: client, VIP: vip, RcvSeq: 1, RecvQueue: []byte("GET / HTTP/1.1\r\n\r\n")})
	p.delivered(client)
	now = now.Add(2 * time.Minute)
	p.reap()
	if len(p.rows()) != 1 {
		t.Fatal("a quiet connection whose socket lives was let go")
	}
	alive = false
	now = now.Add(2 * time.Minute)
	p.reap()
	if len(p.rows()) != 0 {
		t.Fatal("a quiet connection whose socket is gone is still followed")
	}
	if got := <-p.gone; got != client {
		t.Errorf("removal of %v, want %v", got, client)
	}
}

// A handoff whose bytes hold a pipeline not all this BE's is not followed:
// the server would read it whole, so the relay takes it (errPipelined).
func TestBHPipelinedHandoff(t *testing.T) {
	set := &fakeSet{flows: map[netip.AddrPort]bool{}}
	p := newBH(discard(), 8192, set, func(h *phttp.Head) bool { return h.Path != "/other" })
	client, vip := netip.MustParseAddrPort("10.0.0.10:40004"), netip.MustParseAddrPort("10.0.0.100:80")
	for _, tc := range []struct {
		recv string
		err  error
	}{
		{"GET /other HTTP/1.1\r\n\r\n", nil}, // the first request is the FE's choice
		{"GET / HTTP/1.1\r\n\r\nGET /a HTTP/1.1\r\n\r\n", nil},
		{"GET / HTTP/1.1\r\n\r\nGET /other HTTP/1.1\r\n\r\n", errPipelined},
		{"GET / HTTP/1.1\r\n\r\nGET /oth", errPipelined},
	} {
		err := p.track(&wire.ConnInfo{Client: client, VIP: vip, RcvSeq: 1, RecvQueue: []byte(tc.recv)})
		if !errors.Is(err, tc.err) && err != tc.err {
			t.Errorf("%q: %v, want %v", tc.recv, err, tc.err)
		}
	}
}

// A held request starts the move off the reader's goroutine: the
// connection goes WILLHANDOFF, HANDOFFING, and, once it left, HANDOFFED,
// whose late packets are dropped until its row's time is up; a move that
// fails serves the request here.
func TestBHMove(t *testing.T) {
	for _, out := range []moveOutcome{outMoved, outStay} {
		set := &fakeSet{flows: map[netip.AddrPort]bool{}}
		now := time.Unix(1000, 0)
		p := newBH(discard(), 8192, set, func(h *phttp.Head) bool { return h.Path != "/other" })
		var mu sync.Mutex
		p.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
		release := make(chan struct{})
		var states []conntab.State
		p.mover = func(client, vip netip.AddrPort, held []byte, started func()) (moveOutcome, error) {
			if string(held) != "GET /other HTTP/1.1\r\n\r\n" {
				t.Errorf("held %q", held)
			}
			states = append(states, p.rows()[0].State)
			started()
			states = append(states, p.rows()[0].State)
			<-release
			return out, nil
		}
		client, vip := netip.MustParseAddrPort("10.0.0.10:40005"), netip.MustParseAddrPort("10.0.0.100:80")
		ci := &wire.ConnInfo{Client: client, VIP: vip, RcvSeq: 1, RecvQueue: []byte("GET / HTTP/1.1\r\n\r\n")}
		p.track(ci)
		p.delivered(client)
		other := "GET /other HTTP/1.1\r\n\r\n"
		if v, _, r := p.judgeReason(segment(client, vip, ci.ConnMagic(), 0, other)); v != queue.Drop || r != queue.ReasonWillHand {
			t.Errorf("%v: the request for another BE: %v %v", out, v, r)
		}
		if v, _, r := p.judgeReason(segment(client, vip, ci.ConnMagic(), 0, other)); v != queue.Drop || r != queue.ReasonWillHand {
			t.Errorf("%v: its retransmission during the move: %v %v", out, v, r)
		}
		close(release)
		deadline := time.Now().Add(5 * time.Second)
		for {
			rows := p.rows()
			if len(rows) == 1 && (rows[0].State == conntab.Handoffed || rows[0].State == conntab.Established) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%v: rows %+v", out, rows)
			}
			time.Sleep(time.Millisecond)
		}
		if len(states) != 2 || states[0] != conntab.WillHandoff || states[1] != conntab.Handoffing {
			t.Errorf("%v: states during the move %v, want WILLHANDOFF then HANDOFFING", out, states)
		}
		v, _, r := p.judgeReason(segment(client, vip, ci.ConnMagic(), 0, other))
		switch out {
		case outMoved:
			if v != queue.Drop || r != reasonHandoffed {
				t.Errorf("a late packet of a moved connection: %v %v", v, r)
			}
			mu.Lock()
			now = now.Add(3 * time.Second)
			mu.Unlock()
			p.reap()
			if len(p.rows()) != 0 {
				t.Errorf("HANDOFFED row still there: %+v", p.rows())
			}
		case outStay:
			if v != queue.Accept || r != queue.ReasonRetransmit || p.notMoved.Load() != 1 {
				t.Errorf("the request after a failed move: %v %v (not moved %d)", v, r, p.notMoved.Load())
			}
		}
	}
}
