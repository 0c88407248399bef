package relay

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"tcpha/phttp"
)

// A session's phase, as a handover sees it.
const (
	phaseWork = iota // reading a request, waiting for an answer: let it finish
	phaseIdle        // between requests: it can go as it is
	phaseBody        // relaying a response body: it can go between two reads
)

// errHandedOff ends a session whose sockets went to a successor.
var errHandedOff = errors.New("session handed to a successor")

// State is where a session stood when it was handed over: what a new
// process needs besides its sockets to go on as if nothing happened.
type State struct {
	// Body is "" for a session between requests, else how the rest of the
	// response in flight is delimited: "length" (Remaining bytes), "close"
	// (until the web server closes), "chunked" (Chunks, from the bytes in
	// UpBuf then the socket).
	Body      string            `json:"body,omitempty"`
	Remaining int64             `json:"remaining,omitempty"`
	Chunks    phttp.ChunksState `json:"chunks,omitempty"`
	UpBuf     []byte            `json:"up_buf,omitempty"`
	// ClientBuf holds bytes the client sent that the session had read but
	// not relayed: the start of its next request.
	ClientBuf []byte `json:"client_buf,omitempty"`
	// More and Reuse say what follows the response: another request on the
	// client's connection; the upstream connection back to the pool.
	More  bool `json:"more,omitempty"`
	Reuse bool `json:"reuse,omitempty"`
}

// Handed is a session given up for a successor: its sockets, still open,
// and its state. Upstream is nil between requests.
type Handed struct {
	Client   *net.TCPConn
	Upstream *net.TCPConn
	State    State
}

// enterBody starts the body phase, relaying from up.
func (s *session) enterBody(up *Upstream) {
	s.kickUp.Store(up.Conn)
	s.phase.Store(phaseBody)
}

// leaveBody ends the body phase. The upstream connection is forgotten as
// well: back in the pool it may serve another session, which a kick (a
// handover's, or Reset's) must not interrupt.
func (s *session) leaveBody() {
	s.phase.Store(phaseWork)
	s.kickUp.Store(nil)
}

// exportIdle gives the session up between requests.
func (s *session) exportIdle() error {
	st := State{}
	if s.end > s.start {
		st.ClientBuf = bytes.Clone(s.buf[s.start:s.end])
	}
	if s.held != nil {
		// Taken for a request not read yet: back to the pool.
		s.poolOf(s.held).Put(s.held)
		s.held = nil
	}
	return s.export(Handed{Client: s.client, State: st})
}

// exportBody gives the session up in the middle of x's response body:
// rem bytes left of a length-delimited one (< 0: until the server closes),
// or chunks' position in a chunked one.
func (s *session) exportBody(x *exchange, rem int64, chunks *phttp.Chunks) error {
	st := State{Body: "length", Remaining: rem, More: x.after.more, Reuse: x.after.reuse}
	switch {
	case chunks != nil:
		st.Body, st.Remaining, st.Chunks = "chunked", 0, chunks.Save()
		if n := x.up.br.Buffered(); n > 0 {
			b, _ := x.up.br.Peek(n)
			st.UpBuf = bytes.Clone(b)
		}
	case rem < 0:
		st.Body, st.Remaining = "close", 0
	}
	if s.end > s.start {
		st.ClientBuf = bytes.Clone(s.buf[s.start:s.end])
	}
	h := Handed{Client: s.client, Upstream: x.up.Conn, State: st}
	x.up = nil
	return s.export(h)
}

func (s *session) export(h Handed) error {
	s.handOff = true
	s.release()
	s.r.handed <- h
	return errHandedOff
}

// Handover stops the relay's sessions at their next safe point — between
// requests, or between two reads of a response body — and returns them,
// sockets open, for a successor to Resume. Sessions that reach no safe
// point before ctx ends are left running (they end with this process).
// The relay takes no new sessions afterwards: its caller stops first.
func (r *Relay) Handover(ctx context.Context) []Handed {
	r.mu.Lock()
	r.handed = make(chan Handed, len(r.sessions)+len(r.pipes)+16)
	r.mu.Unlock()
	r.handing.Store(true)
	var out []Handed
	past := time.Unix(1, 0)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		// A session kicked while it moves on sees the flag at its next
		// safe point; the kicks repeat for those that moved into one.
		r.mu.Lock()
		left := len(r.sessions) + len(r.pipes)
		for p := range r.pipes {
			// Both ways: each direction pauses at its next read.
			p.client.SetReadDeadline(past)
			p.up.SetReadDeadline(past)
		}
		for s := range r.sessions {
			switch s.phase.Load() {
			case phaseIdle:
				s.client.SetReadDeadline(past)
			case phaseBody:
				if c := s.kickUp.Load(); c != nil {
					c.SetReadDeadline(past)
				}
			}
		}
		r.mu.Unlock()
	drain:
		for {
			select {
			case h := <-r.handed:
				out = append(out, h)
			default:
				break drain
			}
		}
		if left == 0 {
			return out
		}
		select {
		case <-ctx.Done():
			return out
		case <-tick.C:
		}
	}
}

// Resume runs a session a predecessor handed over, from where it stood.
func (r *Relay) Resume(h Handed) error {
	// The kicks' deadlines: a socket passed to another process does not
	// carry them, one resumed in the same process does.
	h.Client.SetDeadline(time.Time{})
	var up *Upstream
	if h.Upstream != nil {
		h.Upstream.SetDeadline(time.Time{})
		var rd io.Reader = h.Upstream
		if len(h.State.UpBuf) > 0 {
			rd = io.MultiReader(bytes.NewReader(h.State.UpBuf), h.Upstream)
		}
		up = &Upstream{Conn: h.Upstream, br: bufio.NewReaderSize(rd, 16<<10), pool: r.cfg.Pool}
	}
	if h.State.Body == BodyTLS {
		if up == nil {
			return errors.New("resume: a TLS connection without its upstream connection")
		}
		r.ServeTLS(h.Client, &TLSUpstream{Conn: h.Upstream})
		return nil
	}
	var chunks phttp.Chunks
	switch h.State.Body {
	case "":
		if up != nil {
			return errors.New("resume: an idle session with an upstream connection")
		}
	case "length", "close":
		if up == nil || h.State.Remaining < 0 {
			return fmt.Errorf("resume: bad %s body state", h.State.Body)
		}
	case "chunked":
		if up == nil {
			return errors.New("resume: a chunked body without its upstream connection")
		}
		if err := chunks.Restore(h.State.Chunks); err != nil {
			return fmt.Errorf("resume: %w", err)
		}
	default:
		return fmt.Errorf("resume: unknown body %q", h.State.Body)
	}
	r.Go(func() {
		s := r.newSession(h.Client)
		s.resumed = true // its first request was routed here long ago
		defer s.finish()
		if len(h.State.ClientBuf) > 0 {
			s.buf = bufs.Get().(*[bufSize]byte)
			s.end = copy(s.buf[:], h.State.ClientBuf)
		}
		if h.State.Body != "" {
			// The rest of the exchange in flight.
			x := &exchange{up: up, responded: true, after: afterBody{more: h.State.More, reuse: h.State.Reuse}}
			var err error
			switch h.State.Body {
			case "length":
				err = s.relayRest(x, h.State.Remaining)
			case "close":
				err = s.relayRest(x, -1)
			case "chunked":
				err = s.relayChunks(x, nil, 0, &chunks)
			}
			if errors.Is(err, errHandedOff) {
				return
			}
			if err != nil {
				x.drop()
				s.logf().Info("relay ended", "op", "relay", "err", err)
				return
			}
			if !s.endExchange(x) {
				s.closeGracefully()
				return
			}
		}
		s.loop()
	})
	return nil
}
