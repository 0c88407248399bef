package relay

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"tcpha/phttp"
)

// spliceMin is the body size from which bytes go socket to socket with
// splice(2) instead of through the relay's buffers (seed 4.2.2's zero-copy
// relay); below it, one read and one write cost less than the pipe.
const spliceMin = 64 << 10

var errClientAborted = errors.New("client went away in the middle of a request")

func clientSide(err error) error {
	if err != nil {
		return fmt.Errorf("%w: %v", errClientAborted, err)
	}
	return nil
}

// sendBody relays the rest of a request body from the client to up: rem
// bytes, or the chunks to their end.
func (s *session) sendBody(up *Upstream, rem int64, chunks *phttp.Chunks) error {
	if chunks == nil {
		if rem >= spliceMin {
			// splice(2). The client may be silent for IdleTimeout, as
			// between two reads below, however long the whole body
			// takes: the deadline moves on while bytes come.
			for {
				s.client.SetReadDeadline(time.Now().Add(s.r.cfg.IdleTimeout))
				n, err := up.Conn.ReadFrom(&io.LimitedReader{R: s.client, N: rem})
				rem -= n
				s.r.bytesIn.Add(n)
				if n > 0 && rem > 0 && errors.Is(err, os.ErrDeadlineExceeded) {
					continue
				}
				return clientSide(err)
			}
		}
		for rem > 0 {
			s.client.SetReadDeadline(time.Now().Add(s.r.cfg.IdleTimeout))
			n, err := s.client.Read(s.buf[:min(int64(bufSize), rem)])
			if n > 0 {
				if _, werr := up.Conn.Write(s.buf[:n]); werr != nil {
					return werr
				}
				s.r.bytesIn.Add(int64(n))
				rem -= int64(n)
			}
			if err != nil {
				return clientSide(err)
			}
		}
		return nil
	}
	// Chunked: read, scan for the end, pass on what belongs to the body;
	// bytes after it are the next request's.
	s.start, s.end = 0, 0
	for {
		s.client.SetReadDeadline(time.Now().Add(s.r.cfg.IdleTimeout))
		n, err := s.client.Read(s.buf[s.end:])
		s.end += n
		if s.end > s.start {
			k, done, serr := chunks.Scan(s.buf[s.start:s.end])
			if serr != nil {
				return serr
			}
			if _, werr := up.Conn.Write(s.buf[s.start : s.start+k]); werr != nil {
				return werr
			}
			s.r.bytesIn.Add(int64(k))
			s.start += k
			if done {
				return nil
			}
			s.start, s.end = 0, 0
		}
		if err != nil {
			return clientSide(err)
		}
	}
}

// relayResponse writes the final response head rh and its body to the
// client. The head stays in the upstream buffer, and goes out (rewritten
// by responseHead) in one write with the body bytes buffered behind it.
func (s *session) relayResponse(x *exchange, rh *phttp.Head, clientKeep bool) error {
	out := responseHead(x.up.head(rh), rh, clientKeep)
	switch rh.Body {
	case phttp.BodyNone:
		err := s.write(x, out)
		x.up.br.Discard(rh.Len)
		return err
	case phttp.BodyLength:
		return s.relayLength(x, out, rh.Len, rh.Length)
	case phttp.BodyClose:
		return s.relayLength(x, out, rh.Len, -1)
	case phttp.BodyChunked:
		return s.relayChunks(x, out, rh.Len, &phttp.Chunks{})
	case phttp.BodyTunnel:
		err := s.write(x, out)
		x.up.br.Discard(rh.Len)
		if err != nil {
			return err
		}
		s.tunnel(x)
	}
	return nil
}

// write sends bytes to the client; once any did, the exchange can only end
// by closing the connection if it fails.
func (s *session) write(x *exchange, out net.Buffers) error {
	x.responded = true
	n, err := out.WriteTo(s.client)
	x.bytes += n
	if err != nil {
		return fmt.Errorf("%w: %v", errClientAborted, err)
	}
	return nil
}

// relayLength relays the head (headLen bytes at the front of the upstream
// buffer, rewritten as out) and n body bytes (n < 0: until the server
// closes): the buffered ones with the head in one write, the rest socket
// to socket.
func (s *session) relayLength(x *exchange, out net.Buffers, headLen int, n int64) error {
	br := x.up.br
	buffered := int64(br.Buffered() - headLen)
	if n >= 0 {
		buffered = min(buffered, n)
	}
	b, _ := br.Peek(headLen + int(buffered))
	err := s.write(x, append(out, b[headLen:]))
	br.Discard(headLen + int(buffered))
	if err != nil {
		return err
	}
	rem := n - buffered
	if n < 0 {
		rem = -1
	}
	return s.relayRest(x, rem)
}

// relayRest relays the rest of a body from the web server's socket, rem
// bytes (rem < 0: until the server closes). A handover stops it between
// two reads and exports what is left.
func (s *session) relayRest(x *exchange, rem int64) error {
	s.enterBody(x.up)
	defer s.leaveBody()
	up := x.up.Conn
	for rem != 0 {
		if s.r.handing.Load() {
			return s.exportBody(x, rem, nil)
		}
		var copied int64
		var err error
		switch {
		case rem < 0:
			// splice(2) until the web server closes.
			copied, err = s.client.ReadFrom(up)
			if err == nil {
				return nil
			}
		case rem < spliceMin:
			copied, err = s.copySmall(&io.LimitedReader{R: up, N: rem})
		default:
			// splice(2) from the web server's socket to the client's.
			copied, err = s.client.ReadFrom(&io.LimitedReader{R: up, N: rem})
			if err == nil && copied == 0 {
				err = io.ErrUnexpectedEOF
			}
		}
		x.bytes += copied
		if rem > 0 {
			rem -= copied
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && s.r.handing.Load() {
				return s.exportBody(x, rem, nil)
			}
			if rem > 0 && !errors.Is(err, errClientAborted) {
				return fmt.Errorf("the web server's body ended %d bytes short: %w", rem, err)
			}
			return err
		}
	}
	return nil
}

// copySmall relays a short rest of a body through a buffer, returning how
// many bytes it relayed.
func (s *session) copySmall(lr *io.LimitedReader) (int64, error) {
	var tmp [8 << 10]byte
	var copied int64
	for lr.N > 0 {
		n, err := lr.Read(tmp[:])
		if n > 0 {
			if _, werr := s.client.Write(tmp[:n]); werr != nil {
				return copied, fmt.Errorf("%w: %v", errClientAborted, werr)
			}
			copied += int64(n)
		}
		if err != nil {
			return copied, err
		}
	}
	return copied, nil
}

// relayChunks relays the head (headLen bytes at the front of the upstream
// buffer, rewritten as out; none when a resumed session goes on with a
// body) and a chunked body through the upstream buffer, scanning the body
// for its end from where c stands.
func (s *session) relayChunks(x *exchange, out net.Buffers, headLen int, c *phttp.Chunks) error {
	br := x.up.br
	skip := headLen // the head's bytes, still at the front of the buffer
	if skip == 0 {
		s.enterBody(x.up)
		defer s.leaveBody()
	}
	for {
		if skip == 0 && s.r.handing.Load() {
			return s.exportBody(x, 0, c)
		}
		if br.Buffered() <= skip {
			if _, err := br.Peek(skip + 1); err != nil {
				if skip == 0 && errors.Is(err, os.ErrDeadlineExceeded) && s.r.handing.Load() {
					return s.exportBody(x, 0, c)
				}
				return fmt.Errorf("the web server closed in the middle of a chunked body: %w", err)
			}
		}
		b, _ := br.Peek(br.Buffered())
		n, done, err := c.Scan(b[skip:])
		if err != nil {
			return err
		}
		werr := s.write(x, append(out, b[skip:skip+n]))
		br.Discard(skip + n)
		if werr != nil {
			return werr
		}
		if done {
			return nil
		}
		if skip > 0 {
			// The head is out: from here the body can go to a successor.
			out, skip = nil, 0
			s.enterBody(x.up)
			defer s.leaveBody()
		}
	}
}

// tunnel relays raw bytes both ways after a 101 or a CONNECT, until both
// directions end; the upstream connection goes with it.
func (s *session) tunnel(x *exchange) {
	up := x.up
	if s.end > s.start {
		up.Conn.Write(s.buf[s.start:s.end])
		s.start = s.end
	}
	s.client.SetReadDeadline(time.Time{})
	if n := up.br.Buffered(); n > 0 {
		b, _ := up.br.Peek(n)
		s.client.Write(b)
		up.br.Discard(n)
	}
	x.up = nil
	Pipe(s.client, up.Conn)
}
