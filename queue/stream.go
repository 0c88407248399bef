package queue

import (
	"errors"

	"tcpha/phttp"
)

// Stream follows the client's bytes of one connection the web server owns
// (`[be] deliver = socket`): the seed's BH (4.8.3). The BE's table queues
// every client segment with payload of such a connection, and Stream says
// how much of each the server may read. It finds where each request starts
// (through Content-Length and chunked bodies), reads its head, and asks
// whether the request is this BE's:
//   - a request for this BE is let through with its body (ESTABLISHED);
//   - a request for another BE is held (WILLHANDOFF): its segments are
//     dropped, so the client sends them again later, and Stream keeps
//     their bytes (bounded) for the move, which takes the connection
//     to the other BE with them;
//   - a head split over segments waits, dropped, until it is whole; the
//     bytes come back with the client's retransmission, at the cost of one
//     retransmission timeout (rare: a head nearly always fits a segment).
//
// It is pure: sequence numbers and bytes in, how many bytes to keep out.
// Sequence numbers wrap (RFC 9293 section 3.4): every comparison is by
// the signed difference.
type Stream struct {
	// acc: the bytes before it go to the web server. pos: the bytes
	// before it are parsed. hold: the parsed bytes the agent keeps, a head
	// being read or, when moving, the requests held for another BE; they
	// end at pos.
	acc, pos uint32
	hold     []byte
	ph       phase
	remain   int64 // Content-Length body bytes left
	chunks   phttp.Chunks
	// committed: the head being read is this BE's whatever it says (its
	// start is already with the server).
	committed bool
	moving    *phttp.Head // WILLHANDOFF: the request held for another BE
	maxHead   int
	maxHold   int
}

type phase uint8

const (
	phHead    phase = iota // between requests, or in a head
	phBody                 // a Content-Length body
	phChunked              // a chunked body
	phRaw                  // every byte is the server's from here on
)

// Here tells whether a request is this BE's by the cluster's rules.
type Here func(h *phttp.Head) bool

// Reasons of a delivered connection's queued segments.
const (
	ReasonHere       Reason = "here"          // all of it is this BE's: accepted
	ReasonRetransmit Reason = "retransmit"    // bytes let through before
	ReasonHeadSplit  Reason = "head-split"    // a head not whole yet: dropped
	ReasonWillHand   Reason = "willhandoff"   // a request for another BE: dropped
	ReasonCut        Reason = "cut"           // the bytes before a held request: accepted, cut
	ReasonOutOfOrder Reason = "out-of-order"  // bytes after a gap: dropped
	ReasonNoFlow     Reason = "not-delivered" // no Stream for the flow: accepted
)

// holdExtra bounds the bytes held beyond a head for a move: the body's
// start that travels with it. The rest the client sends again, to the new
// BE.
const holdExtra = 64 << 10

// NewStream starts following a connection whose next unread byte from the
// client is rcvSeq, with recv the bytes the server has not read yet: all
// of them are this BE's (the handoff's request, and whatever followed it).
// maxHead bounds a head: a longer one is the server's to refuse.
func NewStream(rcvSeq uint32, recv []byte, maxHead int) *Stream {
	s := &Stream{acc: rcvSeq, pos: rcvSeq, maxHead: maxHead, maxHold: maxHead + holdExtra}
	s.feed(recv, func(*phttp.Head) bool { return true })
	if s.ph == phHead && len(s.hold) > 0 {
		// A head's start is with the server already.
		s.committed = true
	}
	s.acc = s.pos
	return s
}

// diff is a - b as a signed distance in sequence space.
func diff(a, b uint32) int64 { return int64(int32(a - b)) }

// Segment judges a segment of seq carrying data: it returns how many of
// its first bytes the server may have (len(data): accept it; 0: drop it;
// between: accept it cut to that) and why. here is consulted for each
// request head that becomes whole.
func (s *Stream) Segment(seq uint32, data []byte, here Here) (keep int, r Reason) {
	if len(data) == 0 {
		return 0, ReasonRetransmit
	}
	d := diff(seq, s.pos)
	if d > 0 {
		// A gap: the bytes before are not parsed, so these cannot be
		// judged. The client sends them again.
		return 0, ReasonOutOfOrder
	}
	seen := -d >= int64(len(data))
	if !seen {
		s.feed(data[-d:], here)
	}
	k := diff(s.acc, seq)
	switch {
	case k >= int64(len(data)) && seen:
		return len(data), ReasonRetransmit
	case k >= int64(len(data)):
		return len(data), ReasonHere
	case k <= 0 && s.moving != nil:
		return 0, ReasonWillHand
	case k <= 0:
		return 0, ReasonHeadSplit
	}
	return int(k), ReasonCut
}

// feed parses new bytes, which start at pos.
func (s *Stream) feed(b []byte, here Here) {
	for len(b) > 0 {
		if s.moving != nil {
			// Held for the move, as far as the bound allows; the rest is
			// not parsed (the client sends it again, to the new BE).
			n := min(len(b), s.maxHold-len(s.hold))
			if n <= 0 {
				return
			}
			s.hold = append(s.hold, b[:n]...)
			s.pos += uint32(n)
			return
		}
		switch s.ph {
		case phRaw:
			s.pass(len(b))
			return
		case phBody:
			n := int(min(s.remain, int64(len(b))))
			s.pass(n)
			s.remain -= int64(n)
			b = b[n:]
			if s.remain == 0 {
				s.ph = phHead
			}
		case phChunked:
			n, done, err := s.chunks.Scan(b)
			if err != nil {
				// A body the server will refuse: it answers and closes,
				// and nothing after it is a request to route.
				s.ph = phRaw
				continue
			}
			s.pass(n)
			b = b[n:]
			if done {
				s.ph = phHead
			}
		case phHead:
			n := max(0, min(len(b), s.maxHead+len("\r\n")*4-len(s.hold)))
			s.hold = append(s.hold, b[:n]...)
			s.pos += uint32(n)
			if s.committed {
				s.acc = s.pos
			}
			b = b[n:]
			rest, ok := s.head(here)
			if !ok {
				if len(b) > 0 && s.moving == nil && s.ph == phHead {
					// The head is over its bound: the server refuses it.
					s.ph = phRaw
				}
				continue
			}
			// The bytes after a head were taken into hold: parse them
			// again as what follows it.
			s.pos -= uint32(len(rest))
			b = append(rest, b...)
		}
	}
}

// pass lets n parsed bytes through.
func (s *Stream) pass(n int) {
	s.pos += uint32(n)
	s.acc = s.pos
}

// head parses the head held in hold. It returns the bytes after the head
// and true when the head was whole and is this BE's, so that parsing goes
// on; false when it waits for more bytes or the request is held.
func (s *Stream) head(here Here) (rest []byte, more bool) {
	if n, err := emptyPrefix(s.hold); err == nil && n > 0 {
		// Empty lines between requests (RFC 9112 section 2.2): the server
		// skips them; they need no decision.
		if !s.committed {
			s.acc += uint32(n)
		}
		s.hold = s.hold[n:]
	}
	if len(s.hold) == 0 {
		s.hold = nil
		return nil, false
	}
	h, err := phttp.ParseRequest(s.hold)
	switch {
	case errors.Is(err, phttp.ErrIncomplete) && len(s.hold) < s.maxHead:
		return nil, false
	case err != nil:
		// Malformed, or over the bound: the server answers 400 and
		// closes; what follows is no request to route.
		s.ph, s.committed = phRaw, false
		s.acc = s.pos
		s.hold = nil
		return nil, false
	}
	if !s.committed && !here(h) {
		s.moving = h
		return nil, false
	}
	rest = append([]byte(nil), s.hold[h.Len:]...)
	s.acc = s.pos - uint32(len(rest))
	s.hold, s.committed = nil, false
	switch {
	case h.Body == phttp.BodyTunnel || h.Upgrade:
		// An upgrade or a tunnel: whether the server takes it or not,
		// its bytes are no longer requests this agent can route safely.
		s.ph = phRaw
	case h.Body == phttp.BodyLength && h.Length > 0:
		s.ph, s.remain = phBody, h.Length
	case h.Body == phttp.BodyChunked:
		s.ph, s.chunks = phChunked, phttp.Chunks{}
	default:
		s.ph = phHead
	}
	return rest, true
}

// emptyPrefix returns the length of the empty lines at the start of b
// that are whole (CRLF or LF), or an error when a lone CR ends b.
func emptyPrefix(b []byte) (int, error) {
	n := 0
	for {
		switch {
		case len(b) > n+1 && b[n] == '\r' && b[n+1] == '\n':
			n += 2
		case len(b) > n && b[n] == '\n':
			n++
		default:
			return n, nil
		}
	}
}

// Moving returns the request held for another BE (nil: none), and the
// bytes the agent holds from its first byte on, which start at sequence
// number seq: what the move carries.
func (s *Stream) Moving() (h *phttp.Head, held []byte, seq uint32) {
	if s.moving == nil {
		return nil, nil, 0
	}
	return s.moving, s.hold, s.acc
}

// Stay serves the held request here after all (the move failed: the
// client had not acknowledged every response byte in time, or no BE took
// it): the bytes held are parsed again as this BE's, and the next
// segments that carry them are let through.
func (s *Stream) Stay() {
	if s.moving == nil {
		return
	}
	held := s.hold
	s.moving, s.hold = nil, nil
	s.pos, s.committed = s.acc, true
	s.feed(held, func(*phttp.Head) bool { return true })
}

// Next is the sequence number of the first byte the server has not been
// let have.
func (s *Stream) Next() uint32 { return s.acc }
