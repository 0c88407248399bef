package relay

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"time"
)

// A handed-off TLS connection (issue 16) is not HTTP the relay can read:
// its request is a ClientHello and everything after it is encrypted. The BE
// carries it byte for byte to its web server's TLS port, where the
// certificates are, and it stays on this BE to its end: no keep-alive
// boundary can be seen, so phttp = multi and forward do not apply, and the
// upstream connection is the client's alone (never pooled).

// recordHandshake is a TLS handshake record's content type (RFC 8446
// section 5.1).
const recordHandshake = 22

// IsTLS tells whether a handed-off connection's request (the bytes at the
// head of its receive queue) is a TLS ClientHello. The FE hands off only
// two kinds of request: an HTTP request head, which never begins with the
// control byte 0x16 (the FE's HTTP reader refuses it, RFC 9112 section
// 3), and from its TLS port a ClientHello, which always does. So the BE
// needs neither the FE's tlsport nor a flag in the handoff frame.
func IsTLS(request []byte) bool { return len(request) > 0 && request[0] == recordHandshake }

// TLSUpstream is one client's connection to the web server's TLS port.
type TLSUpstream struct{ Conn *net.TCPConn }

// Close closes the connection.
func (u *TLSUpstream) Close() error { return u.Conn.Close() }

// DialTLS connects to the web server's TLS port at addr for a client's
// connection to vip; with proxy, the connection starts with a PROXY
// protocol v2 header naming them, so that the web server logs and filters
// on the client's address rather than the relay's.
func DialTLS(ctx context.Context, addr, client, vip netip.AddrPort, proxy bool) (*TLSUpstream, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp4", addr.String())
	if err != nil {
		return nil, fmt.Errorf("connect to the TLS server %v: %w", addr, err)
	}
	tc := c.(*net.TCPConn)
	if proxy {
		if _, err := tc.Write(ProxyHeaderV2(client, vip)); err != nil {
			tc.Close()
			return nil, fmt.Errorf("send the PROXY header to %v: %w", addr, err)
		}
	}
	return &TLSUpstream{Conn: tc}, nil
}

// BodyTLS is State.Body for a TLS connection handed to a successor: a raw
// relay with no exchange to resume, just its two sockets to pipe again.
const BodyTLS = "tls"

// tlsPipe is a relayed TLS connection, registered so that a handover can
// pause it.
type tlsPipe struct {
	client, up *net.TCPConn
	since      time.Time
}

// ServeTLS relays a committed TLS connection to up until both directions
// end, counted by the relay's Tracker. Pipe splices: the bytes stay in the
// kernel. A handover (Handover) pauses it and hands both sockets on, so
// an upgrade of the BE's agent does not end it.
func (r *Relay) ServeTLS(client *net.TCPConn, up *TLSUpstream) {
	p := &tlsPipe{client: client, up: up.Conn, since: time.Now()}
	r.mu.Lock()
	if r.pipes == nil {
		r.pipes = map[*tlsPipe]struct{}{}
	}
	r.pipes[p] = struct{}{}
	r.mu.Unlock()
	r.Go(func() {
		// Handed before it leaves the registry, as sessions are: Handover
		// stops looking once the registry is empty.
		if pipe(p.client, p.up, r.handing.Load) {
			r.handed <- Handed{Client: p.client, Upstream: p.up, State: State{Body: BodyTLS}}
		}
		r.mu.Lock()
		delete(r.pipes, p)
		r.mu.Unlock()
	})
}
