package frontend

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"time"

	"tcpha/backends"
	"tcpha/frontend/tlshello"
	"tcpha/handoff/repair"
	"tcpha/relay"
)

// The VIP's TLS port (issue 16): a connection there is routed by the name
// in its ClientHello and handed off with the ClientHello as its request,
// never decrypted. The BE relays it byte for byte to its own TLS server,
// which holds the certificates; later requests are encrypted, so the
// connection stays on that BE.

// initTLS makes every refusal reason a label from the start, so that a
// dashboard sees zeros rather than missing series.
func (s *Server) initTLS() {
	for _, r := range tlshello.Reasons() {
		s.Metrics.TLSRefused.WithLabelValues(r.String())
	}
}

// serveTLS handles one connection on the TLS port: read its ClientHello
// within the deadline, route it by SNI, hand it off, or refuse it with a
// TLS alert (or a 400 for plain HTTP) and close.
func (s *Server) serveTLS(ctx context.Context, c *net.TCPConn, client netip.AddrPort, deadline time.Time) {
	c.SetReadDeadline(deadline)
	hello, err := tlshello.Read(c, tlshello.Max)
	s.headDone(client.Addr())
	if err != nil {
		s.refuseTLS(c, client, err)
		return
	}
	c.SetReadDeadline(time.Time{})
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		s.alert(c, tlshello.AlertInternalError)
		return
	}
	defer func() { <-s.slots }()

	route := s.Route(backends.Request{Host: hello.SNI, TLS: true})
	log := s.Log.With("client", client.String(), "sni", hello.SNI, "alpn", strings.Join(hello.ALPN, ","))
	if len(route.BEs) > 0 {
		start := time.Now()
		be, err := s.Sender.Migrate(ctx, repair.Socket{Conn: c}, client, hello.Raw, route.BEs)
		if err == nil {
			lat := time.Since(start)
			s.Metrics.ObserveHandoff(lat)
			s.count(func(c *Counters) { c.HandedOff++; c.HandoffLatencySum += lat; c.HandoffLatencyCount++ })
			log.Debug("handed off", "op", "handoff", "be", be.Addr().String(), "latency", lat,
				"records", hello.Records, "hello_bytes", len(hello.Raw))
			return
		}
		log.Info("handoff failed; FE keeps the connection", "op", "handoff", "err", err)
		if !s.handoffFailed(err) {
			c.Close()
			return
		}
	}
	// No BE took it. A `local` rule does not serve TLS: the local node is
	// the FE's HTTP server (redirectport), which has no certificates. The
	// client gets what a TLS server without a back end would say.
	s.Metrics.Handoffs.WithLabelValues("503").Inc()
	s.count(func(c *Counters) { c.Answered503++ })
	log.Info("no back end for a TLS connection", "op", "route")
	s.alert(c, tlshello.AlertInternalError)
}

// refuseTLS answers a connection whose ClientHello could not be read: a
// fatal alert, an HTTP 400 for plain HTTP, or a close (tlshello.Reply). Each
// refusal is counted by reason.
func (s *Server) refuseTLS(c *net.TCPConn, client netip.AddrPort, err error) {
	reason := tlshello.ReasonOf(err)
	s.Metrics.TLSRefused.WithLabelValues(reason.String()).Inc()
	switch reason {
	case tlshello.ReasonTimeout:
		s.count(func(c *Counters) { c.Timeouts++ })
	case tlshello.ReasonEmpty, tlshello.ReasonTruncated, tlshello.ReasonAlert:
		s.count(func(c *Counters) { c.ClosedEarly++ })
		s.Log.Debug("client closed before a ClientHello", "op", "read", "client", client.String(), "err", err)
		c.Close()
		return
	case tlshello.ReasonOversized:
		s.count(func(c *Counters) { c.TooLarge++ })
	default:
		s.count(func(c *Counters) { c.BadRequests++ })
	}
	s.Log.Info("TLS connection refused", "op", "read", "client", client.String(), "reason", reason.String(), "err", err)
	if reply := tlshello.Reply(err); reply != nil {
		c.SetWriteDeadline(time.Now().Add(time.Second))
		c.Write(reply)
		// What the client sent and was not read would turn the close into
		// a RST and lose the reply.
		relay.CloseGracefully(c, time.Second)
	}
	c.Close()
}

// alert sends a fatal TLS alert and closes c.
func (s *Server) alert(c *net.TCPConn, desc uint8) {
	c.SetWriteDeadline(time.Now().Add(time.Second))
	c.Write(tlshello.AlertRecord(desc))
	relay.CloseGracefully(c, time.Second)
	c.Close()
}
