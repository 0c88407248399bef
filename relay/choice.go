package relay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"tcpha/phttp"
)

// upstream makes x.up a connection to the first of pools that gives one
// (nil: the local web server); the pools after it are the fallback. The
// connection x holds already serves if it is of that pool.
func (s *session) upstream(x *exchange, pools []*Pool) error {
	err := errors.New("no back end for this request")
	for i, p := range pools {
		x.fallback = pools[i+1:]
		if p == nil {
			p = s.r.cfg.Pool
		}
		if x.up != nil {
			if s.poolOf(x.up) == p {
				x.pool = p
				return nil
			}
			// The first request's connection, unused: back to its pool.
			s.poolOf(x.up).Put(x.up)
			x.up = nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		var up *Upstream
		up, err = p.Get(ctx)
		cancel()
		if err == nil {
			x.up, x.pool = up, p
			return nil
		}
	}
	return err
}

// poolOf is the pool up came from.
func (s *session) poolOf(up *Upstream) *Pool {
	if up.pool != nil {
		return up.pool
	}
	return s.r.cfg.Pool
}

// sendRequest writes the request's first bytes, out, to an upstream
// connection of the first of pools that gives one (nil: the local web
// server), the exchange's own if it has one.
func (s *session) sendRequest(x *exchange, out net.Buffers, pools []*Pool) error {
	if err := s.upstream(x, pools); err != nil {
		return err
	}
	if x.unchecked {
		x.unchecked = false
		if closing(x.up.Conn) {
			// The web server closed the connection taken at the offer
			// (its check passed then): another, from the pool or dialed.
			// Nothing was sent; it counts as a retry.
			s.r.retries.Add(1)
			x.drop()
			if err := s.upstream(x, pools); err != nil {
				return err
			}
		}
	}
	x.retryable = mayRetry(x.req.Method, x.whole, x.up.idled)
	// WriteTo consumes the Buffers it writes: sent stays whole for a retry.
	x.sent = out
	for _, b := range out {
		s.r.bytesIn.Add(int64(len(b)))
	}
	bufs := append(net.Buffers(nil), out...)
	if _, err := bufs.WriteTo(x.up.Conn); err != nil {
		if !x.retryable {
			return err
		}
		return s.retry(x)
	}
	return nil
}

// mayRetry tells whether a request may be sent again on a new connection
// when the one it went on fails before any answer: only one that may be
// repeated (an idempotent method, RFC 9110 section 9.2.2), whole in hand
// (its body is not read again), and sent on a connection that sat idle
// (idled), which the server may have closed meanwhile; a new connection
// failing is the server's answer.
func mayRetry(method string, whole, idled bool) bool {
	return whole && idled && idempotent(method)
}

func idempotent(method string) bool {
	switch method {
	case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE":
		return true
	}
	return false
}

// retry sends the request again on a new connection. A connection that
// sat idle (pooled, or held from the offer) and that the server closed
// meanwhile shows only when its answer does not come if the close had not
// arrived when the session looked; a request that may be repeated
// (idempotent, and whole in hand) is then sent once more, as HAProxy's
// retry-on does. A new connection failing too gets 502.
func (s *session) retry(x *exchange) error {
	s.r.retries.Add(1)
	pool := s.poolOf(x.up)
	x.drop()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	up, err := pool.Fresh(ctx)
	cancel()
	if err != nil && len(x.fallback) > 0 {
		// A forwarded request whose BE's web server is gone: the next.
		if err = s.upstream(x, x.fallback); err == nil {
			up, x.up = x.up, nil
		}
	}
	if err != nil {
		return err
	}
	x.up, x.retryable, x.pool = up, false, s.poolOf(up)
	bufs := append(net.Buffers(nil), x.sent...)
	_, err = bufs.WriteTo(up.Conn)
	return err
}

// maxResponseHead bounds a response head from the web server (the upstream
// buffer).
const maxResponseHead = 16 << 10

// readResponseHead reads the next response head from the web server; it
// stays in the upstream buffer until relayed. An idled connection that
// fails before the first byte of the answer gets the request again, once,
// on a new connection.
func (s *session) readResponseHead(x *exchange) (*phttp.Head, error) {
	for {
		h, err := peekHead(x.up.br, x.req.Method)
		if err == nil {
			return h, nil
		}
		if x.retryable && !x.responded && x.up.br.Buffered() == 0 {
			if rerr := s.retry(x); rerr == nil {
				continue
			}
		}
		s.r.badGateway.Add(1)
		if x.routed && x.whole && !x.responded {
			s.logf().Info("forwarded request failed", "op", "forward", "err", err)
			x.drop() // if a failed retry did not already
			if s.answerKeep(x, 503, "no back end can serve this request now") {
				return nil, errAnsweredKeep
			}
		}
		if !x.responded {
			s.answer(x, 502, "the web server did not answer")
		}
		return nil, fmt.Errorf("read the web server's answer: %w", err)
	}
}

// peekHead parses the response head (to a request of method) at the front
// of br, reading until it is whole, and leaves it there.
func peekHead(br *bufio.Reader, method string) (*phttp.Head, error) {
	for {
		// Everything buffered is parsed; only an incomplete head waits for
		// one more byte than that.
		if b, _ := br.Peek(br.Buffered()); len(b) > 0 {
			h, err := phttp.ParseResponse(b, method)
			if err == nil {
				return h, nil
			}
			if !errors.Is(err, phttp.ErrIncomplete) {
				return nil, err
			}
		}
		n := br.Buffered() + 1
		if n > maxResponseHead {
			return nil, fmt.Errorf("%w: response head over %d bytes", phttp.ErrMalformed, maxResponseHead)
		}
		if _, err := br.Peek(n); err != nil {
			return nil, err
		}
	}
}

// head returns the bytes of the response head h at the front of u's buffer.
func (u *Upstream) head(h *phttp.Head) []byte {
	b, _ := u.br.Peek(h.Len)
	return b
}
