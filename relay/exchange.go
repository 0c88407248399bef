package relay

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"tcpha/phttp"
)

// exchange is one request and its response: what the session decided for
// it and where it stands. The session makes one per request and hands it
// to each job (choice.go, pump.go, handover.go); what lasts from request
// to request stays on the session.
type exchange struct {
	req *phttp.Head
	// routed: the request is fetched from other BEs' web servers (phttp =
	// forward); fallback: the pools still to try if the chosen one fails
	// before answering; whole: the request is whole in hand, so that a
	// failure can be answered with the client's connection kept.
	routed, whole bool
	fallback      []*Pool
	// up is the upstream connection; unchecked: it is the one taken when
	// the handoff was accepted, not looked at since.
	up        *Upstream
	unchecked bool
	// sent is the request's bytes as sent upstream; retryable: they may be
	// sent once more on a new connection (mayRetry).
	sent      net.Buffers
	retryable bool
	// responded: the client got bytes of the response already.
	responded bool
	// after is what follows the response whose body is being relayed.
	after afterBody
	// For the access log: the pool whose web server answered (nil: none
	// did), the final status, the relay's own answer, the bytes that went
	// to the client, and when the head was read.
	pool     *Pool
	status   int
	answered bool
	bytes    int64
	start    time.Time
	moveLat  time.Duration
}

// afterBody is what follows the response whose body is being relayed.
type afterBody struct {
	more  bool // the client connection goes on to another request
	reuse bool // the upstream connection may serve another
}

// drop closes the upstream connection an exchange still holds: it did
// not end cleanly, so the connection cannot go back to its pool.
func (x *exchange) drop() {
	if x.up != nil {
		x.up.Close()
		x.up = nil
	}
}

// planFor says where a connection's request for host and path goes: here
// for its first (later false), and by the rules (route; nil: none) for a
// later one. It is made once per request, as a scheduler's choice among
// several BEs moves on with each call.
func planFor(later bool, route func(host, path string) Rules, host, path string) Plan {
	if !later || route == nil {
		return here
	}
	return Decide(route(host, path))
}

// errAnsweredKeep: the request got an error answer and the client's
// connection goes on.
var errAnsweredKeep = errors.New("answered, connection kept")

// serveRequest relays the request of x and its response where plan says.
// It reports whether the client connection goes on to another request.
func (s *session) serveRequest(x *exchange, plan Plan) (more bool, err error) {
	h := x.req
	head := s.buf[s.start : s.start+h.Len]
	s.start += h.Len
	out, upKeep := requestOut(head, h, s.forwardedFor())
	clientKeep := h.KeepAlive
	// The part of the body already read.
	var rem int64
	var chunks *phttp.Chunks
	switch h.Body {
	case phttp.BodyLength:
		n := min(h.Length, int64(s.end-s.start))
		out = append(out, s.buf[s.start:s.start+int(n)])
		s.start += int(n)
		rem = h.Length - n
	case phttp.BodyChunked:
		chunks = &phttp.Chunks{}
		n, done, err := chunks.Scan(s.buf[s.start:s.end])
		if err != nil {
			s.answer(x, 400, err.Error())
			return false, err
		}
		out = append(out, s.buf[s.start:s.start+n])
		s.start += n
		if done {
			chunks = nil
		}
	}
	bodySent := rem == 0 && chunks == nil
	pools := []*Pool{nil}
	x.routed, x.whole = !plan.Here, bodySent
	if x.routed {
		pools = plan.Pools
	}
	if err := s.sendRequest(x, out, pools); err != nil {
		s.r.badGateway.Add(1)
		if x.routed {
			// Content of other BEs that none could serve: this request
			// gets a 503. The connection goes on if the request is whole
			// in hand and the client keeps it; with a body still to come
			// it cannot.
			s.logf().Info("forwarded request failed", "op", "forward", "path", h.Path, "err", err)
			// The connection the request failed on: no use to the next.
			x.drop()
			if bodySent && clientKeep && s.answerKeep(x, 503, "no back end can serve this request now") {
				return true, nil
			}
			s.answer(x, 503, "no back end can serve this request now")
			return false, nil
		}
		s.answer(x, 502, "the web server is unreachable")
		return false, err
	}
	for {
		// Expect: 100-continue with the body still to come: the web
		// server answers first (nginx sends 100 as soon as it wants the
		// body); then the body goes.
		if !bodySent && !(h.Continue && !x.responded) {
			if err := s.sendBody(x.up, rem, chunks); err != nil {
				return false, err
			}
			bodySent = true
		}
		rh, err := s.readResponseHead(x)
		if errors.Is(err, errAnsweredKeep) {
			return clientKeep, nil
		}
		if err != nil {
			return false, err
		}
		if rh.Status < 200 && rh.Status != 101 {
			// Interim: to the client as is, then the next head.
			err := s.write(x, net.Buffers{x.up.head(rh)})
			x.up.br.Discard(rh.Len)
			if err != nil {
				return false, err
			}
			continue
		}
		if !bodySent {
			// A final answer instead of 100: the client may or may not send
			// its body now, so neither connection can be trusted after.
			upKeep, clientKeep = false, false
		}
		x.after = afterResponse(clientKeep, upKeep, rh)
		x.status = rh.Status
		if err := s.relayResponse(x, rh, clientKeep); err != nil {
			return false, err
		}
		if rh.Body == phttp.BodyTunnel {
			return false, nil // both sockets ended with the tunnel
		}
		return s.endExchange(x), nil
	}
}

// endExchange returns the upstream connection to the pool or closes it,
// and says whether the client connection goes on.
func (s *session) endExchange(x *exchange) bool {
	if x.after.reuse {
		s.poolOf(x.up).Put(x.up)
	} else {
		x.up.Close()
	}
	x.up = nil
	return x.after.more
}

// answerKeep answers the current request with status and keeps the
// connection open for the next; it reports whether the answer went out.
func (s *session) answerKeep(x *exchange, status int, why string) bool {
	if x.responded {
		return false
	}
	x.responded = true
	body := why + "\n"
	s.client.SetWriteDeadline(time.Now().Add(time.Second))
	defer s.client.SetWriteDeadline(time.Time{})
	n, err := fmt.Fprintf(s.client, "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s",
		status, http.StatusText(status), len(body), body)
	x.status, x.answered, x.bytes = status, true, x.bytes+int64(n)
	return err == nil
}

// answer sends an error response of the relay's own, if nothing of the
// response went out yet, saying that the connection closes.
func (s *session) answer(x *exchange, status int, why string) {
	if x.responded {
		return
	}
	x.responded = true
	s.client.SetWriteDeadline(time.Now().Add(time.Second))
	n, _ := s.client.Write(phttp.ErrorResponse(status, why))
	s.client.SetWriteDeadline(time.Time{})
	x.status, x.answered, x.bytes = status, true, x.bytes+int64(n)
}
