package frontend

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"tcpha/backends"
	"tcpha/handoff"
	"tcpha/handoff/repair"
	"tcpha/metrics"
)

// captureConn is a net.Conn that keeps what crypto/tls's client writes
// and reads nothing: its first write is the ClientHello.
type captureConn struct {
	net.Conn
	written bytes.Buffer
}

func (c *captureConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (c *captureConn) Write(b []byte) (int, error)      { return c.written.Write(b) }
func (c *captureConn) Close() error                     { return nil }
func (c *captureConn) SetDeadline(time.Time) error      { return nil }
func (c *captureConn) SetReadDeadline(time.Time) error  { return nil }
func (c *captureConn) SetWriteDeadline(time.Time) error { return nil }

// clientHello is the ClientHello Go's TLS client sends for name.
func clientHello(t *testing.T, name string) []byte {
	t.Helper()
	c := &captureConn{}
	tls.Client(c, &tls.Config{ServerName: name, InsecureSkipVerify: true, NextProtos: []string{"h2", "http/1.1"}}).Handshake()
	if c.written.Len() == 0 {
		t.Fatal("crypto/tls wrote no ClientHello")
	}
	return c.written.Bytes()
}

// recordMigrator keeps what each handoff was given and closes the client.
type recordMigrator struct {
	mu       sync.Mutex
	consumed [][]byte
}

func (m *recordMigrator) Migrate(_ context.Context, sock handoff.Socket, _ netip.AddrPort, consumed []byte, _ []netip.AddrPort) (netip.AddrPort, error) {
	m.mu.Lock()
	m.consumed = append(m.consumed, append([]byte(nil), consumed...))
	m.mu.Unlock()
	sock.(repair.Socket).Conn.Close()
	return netip.MustParseAddrPort("10.0.0.11:666"), nil
}

func (m *recordMigrator) Keep(context.Context, netip.AddrPort) {}

type tlsRig struct {
	addr   string
	s      *Server
	m      *recordMigrator
	mu     sync.Mutex
	routed []backends.Request
	route  *backends.Route // nil: toBE()
}

func newTLSRig(t *testing.T, cfg Config) *tlsRig {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tlsLn, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &tlsRig{addr: tlsLn.Addr().String(), m: &recordMigrator{}}
	r.s = &Server{Config: cfg, Sender: r.m, Metrics: metrics.New(), Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Route: func(q backends.Request) backends.Route {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.routed = append(r.routed, q)
			if r.route != nil {
				return *r.route
			}
			return toBE()
		}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.s.ServeWithTLS(ctx, context.Background(), ln, tlsLn); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return r
}

// A ClientHello cut into two TLS records and written in three TCP
// segments is routed by its SNI, as TLS, and handed off with exactly its
// bytes as the request.
func TestTLSRoutesBySNI(t *testing.T) {
	r := newTLSRig(t, defaults())
	hello := clientHello(t, "B.Example")
	// Two records: the handshake message split at 40 bytes.
	msg := hello[5:]
	rec := func(b []byte) []byte { return append([]byte{22, 3, 1, byte(len(b) >> 8), byte(len(b))}, b...) }
	wire := append(rec(msg[:40]), rec(msg[40:])...)
	c, err := net.Dial("tcp4", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetNoDelay(true)
	for _, part := range [][]byte{wire[:3], wire[3:60], wire[60:]} {
		c.Write(part)
		time.Sleep(20 * time.Millisecond)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.ReadAll(c) // the fake handoff closes it
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.routed) != 1 || r.routed[0] != (backends.Request{Host: "b.example", TLS: true}) {
		t.Fatalf("routed %+v, want b.example as TLS", r.routed)
	}
	r.m.mu.Lock()
	defer r.m.mu.Unlock()
	if len(r.m.consumed) != 1 || !bytes.Equal(r.m.consumed[0], wire) {
		t.Errorf("handed off %d bytes, want the %d of the two records", len(r.m.consumed[0]), len(wire))
	}
}

// A hello without SNI is routed with an empty host, as TLS.
func TestTLSNoSNI(t *testing.T) {
	r := newTLSRig(t, defaults())
	c, err := net.Dial("tcp4", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(clientHello(t, "10.0.0.100")) // an IP literal: crypto/tls sends no SNI
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.ReadAll(c)
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.routed) != 1 || r.routed[0] != (backends.Request{TLS: true}) {
		t.Errorf("routed %+v, want no host, TLS", r.routed)
	}
}

// Plain HTTP on the TLS port gets a 400, garbage and an oversized hello a
// close or an alert, a silent client a close at requesttimeout; none hangs,
// and each is counted by reason.
func TestTLSRefusals(t *testing.T) {
	cfg := defaults()
	cfg.RequestTimeout = 300 * time.Millisecond
	r := newTLSRig(t, cfg)
	dial := func() net.Conn {
		c, err := net.Dial("tcp4", r.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		return c
	}
	c := dial()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 400 {
		t.Errorf("plain HTTP: %v %v, want 400", resp, err)
	}
	c.Close()

	for name, tc := range map[string]struct {
		send  []byte
		reply []byte // nil: closed without a word
	}{
		"garbage":   {[]byte("\x00\x01\x02\x03\x04\x05 hello"), nil},
		"oversized": {[]byte{22, 3, 1, 0x40, 0x00, 1, 0, 0x40, 0}, []byte{21, 3, 1, 0, 2, 2, 47}},
		"silent":    {nil, nil},
	} {
		c := dial()
		c.Write(tc.send)
		start := time.Now()
		got, err := io.ReadAll(c)
		if err != nil && !strings.Contains(err.Error(), "reset") {
			t.Errorf("%s: %v after %v (hung?)", name, err, time.Since(start))
		}
		if !bytes.Equal(got, tc.reply) {
			t.Errorf("%s: got % x, want % x", name, got, tc.reply)
		}
		c.Close()
	}
	waitFor(t, "refusals counted", func() bool {
		return refused(t, r.s.Metrics, "timeout") == 1
	})
	for _, reason := range []string{"http", "garbage", "oversized", "timeout"} {
		if n := refused(t, r.s.Metrics, reason); n != 1 {
			t.Errorf("tcpha_tls_refused_total{reason=%q} = %v, want 1", reason, n)
		}
	}
	r.m.mu.Lock()
	defer r.m.mu.Unlock()
	if len(r.m.consumed) != 0 {
		t.Errorf("%d refused connections were handed off", len(r.m.consumed))
	}
}

// refused reads tcpha_tls_refused_total{reason}.
func refused(t *testing.T, m *metrics.Metrics, reason string) float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "tcpha_tls_refused_total" {
			continue
		}
		for _, x := range mf.GetMetric() {
			if x.GetLabel()[0].GetValue() == reason {
				return x.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no tcpha_tls_refused_total{reason=%q}", reason)
	return 0
}

// A TLS connection no BE takes gets a fatal internal_error alert, the TLS
// form of the HTTP port's 503, and is counted as answered 503; a local
// rule does not serve TLS.
func TestTLSNoBE(t *testing.T) {
	for name, route := range map[string]backends.Route{"no BE": {}, "local": {Local: true}} {
		r := newTLSRig(t, defaults())
		r.mu.Lock()
		r.route = &route
		r.mu.Unlock()
		c, err := net.Dial("tcp4", r.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write(clientHello(t, "a.example"))
		got, _ := io.ReadAll(c)
		c.Close()
		if want := []byte{21, 3, 1, 0, 2, 2, 80}; !bytes.Equal(got, want) {
			t.Errorf("%s: got % x, want the internal_error alert % x", name, got, want)
		}
		if n := r.s.Stats().Answered503; n != 1 {
			t.Errorf("%s: Answered503 = %d, want 1", name, n)
		}
	}
}
