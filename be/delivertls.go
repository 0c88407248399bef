package be

// TLS with `[be] deliver = socket` (issue 15 item 3): a handed-off TLS
// connection goes to the web server's TLS socket (redirecttlsport) the way
// an HTTP one goes to its port, with no relay at all. Its request, the
// ClientHello the FE read, is in the rebuilt socket's receive queue, as an
// HTTP request head is, and the server does the handshake with the client
// itself. A TLS connection stays on its BE to its end (issue 16: its later
// requests are encrypted), so phttp does not limit it. Whatever fails
// falls back to the raw TLS relay (relay.DialTLS, ServeTLS), counted like
// HTTP's fallbacks.
//
// The client's address at the server: with clientaddr = on the server's
// connection is dialed from it, so the server sees it as its peer. With
// proxyprotocol = on the server's TLS listener expects a PROXY v2 header
// first (`listen … ssl proxy_protocol`), whatever the peer: the header is
// put in the receive queue ahead of the ClientHello, as the relay would
// have sent it, and the server reads the client from it. So both modes
// give nginx the same answer in every combination, clientaddr = off
// included: with proxyprotocol = off and clientaddr = off nginx sees
// 127.0.0.1, as with the relay.

import (
	"context"
	"strings"

	"tcpha/config"
	"tcpha/handoff"
	"tcpha/handoff/wire"
	"tcpha/relay"
)

// tlsRestore is what the web server's TLS socket is given for the TLS
// connection ci: ci itself, or with proxy a copy whose receive queue holds
// a PROXY v2 header naming the client and the VIP ahead of the ClientHello.
// The header's bytes take the sequence numbers before the client's first
// byte (RcvSeq moves back by its length), so that the socket's next
// expected sequence number, ConnMagic, which it acks, is the client's
// own: the client never sees them.
func tlsRestore(ci *wire.ConnInfo, proxy bool) *wire.ConnInfo {
	if !proxy {
		return ci
	}
	h := relay.ProxyHeaderV2(ci.Client, ci.VIP)
	rc := *ci
	rc.RecvQueue = append(h, ci.RecvQueue...)
	rc.RcvSeq = ci.RcvSeq - uint32(len(h))
	return &rc
}

// newTLSDeliverer is the deliverer of the BE's TLS connections, to the
// server's TLS port, falling back to the TLS relay.
func (b *BE) newTLSDeliverer(cfg *config.BE, d *deliverer) *deliverer {
	t := newDeliverer(cfg.RedirectTLS(), cfg.ClientAddr, b.log.With("proto", "tls"), d.metric)
	t.eligible = func() string { return "" }
	t.relay = func(ctx context.Context, ci *wire.ConnInfo) (handoff.Upstream, error) {
		up, err := relay.DialTLS(ctx, cfg.RedirectTLS(), ci.Client, ci.VIP, cfg.ProxyProtocol)
		if err != nil {
			return nil, err
		}
		return up, nil
	}
	proxy := cfg.ProxyProtocol
	t.restore = func(ci *wire.ConnInfo) *wire.ConnInfo { return tlsRestore(ci, proxy) }
	t.clear = d.clear
	// Connections to the TLS port are kept ready (clientaddr = off) only
	// while an FE hands TLS connections off.
	t.wanted = func() bool {
		for _, s := range b.server.Sessions() {
			if s.Peer.Role == wire.RoleFE && s.Peer.TLSPort != 0 {
				return true
			}
		}
		return false
	}
	return t
}

// formatTLSCounts is formatCounts for the TLS connections, each key
// prefixed with tls_ (tcphactl status).
func formatTLSCounts(m map[string]int64) string {
	f := strings.Fields(formatCounts(m))
	for i := range f {
		f[i] = "tls_" + f[i]
	}
	return strings.Join(f, " ")
}

// tlsDeliveries are the TLS connections' delivery counts, nil without
// deliver = socket.
func (b *BE) tlsDeliveries() map[string]int64 {
	if b.deliverTLS == nil {
		return nil
	}
	return b.deliverTLS.Counts()
}
