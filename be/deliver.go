package be

// `[be] deliver = socket` (issue 15): the rebuilt client connection becomes
// the web server's own socket (handoff/transplant), and the server answers
// the client itself, with no relay. Each connection that cannot be
// delivered falls back to the relay, and the reason is counted.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"tcpha/handoff"
	"tcpha/handoff/transplant"
	"tcpha/handoff/wire"
	"tcpha/netif"
)

const (
	// readyIdles is how many idle server connections are kept dialed and
	// accepted ahead, so that the dial and the fd search (~100 µs and
	// more when the server is busy: FACTS.md) are off the handoff's path.
	// A burst beyond it prepares inline.
	readyIdles = 8
	// idleMaxAge bounds how long a ready connection waits: only freshly
	// accepted ones are taken. nginx closes a connection that sent no
	// request after client_header_timeout (60 s by default); a reload
	// closes the old workers' idle ones at once (those fail their check
	// and are replaced).
	idleMaxAge = 20 * time.Second
	// inlineWait bounds an inline preparation on the handoff's path.
	inlineWait = 200 * time.Millisecond
	// failedPause: after a preparation failed for a reason that repeats
	// (the server is down, denies ptrace, listens `deferred`), or
	// pauseAfter times in a row, the next connections fall back at once
	// for this long instead of each waiting for the same failure. A single
	// late accept under load is no reason: it paused a busy BE's
	// deliveries for a second (792 of 2,000 relayed in a test).
	failedPause = time.Second
	pauseAfter  = 3
	// stageTries bounds the idle connections one handoff tries when they
	// turn out closed (a reload replaced the workers).
	stageTries = 3
)

// Result labels of tcpha_deliveries_total besides the transplant reasons.
const (
	resultDelivered = "delivered"
	// resultPHTTP: the FE's phttp is forward (or multi while the BE's
	// packet path has no queue yet) and its rules name other BEs; a
	// delivered connection's later requests would reach the server, and
	// could not be fetched from another BE's.
	resultPHTTP = "phttp"
	// resultClear: an earlier socket of the same 4-tuple could not be
	// cleared out of the way.
	resultClear = "clear"
	// resultPacketPath: the BE's packet path could not start following
	// the connection's later requests (bh.go).
	resultPacketPath = "packet-path"
	// resultPipelined: the handoff's bytes hold pipelined requests not
	// all this BE's; the server would read them all (bh.go).
	resultPipelined = "pipelined"
)

// DeliverResults lists the labels of tcpha_deliveries_total.
func DeliverResults() []string {
	out := []string{resultDelivered, resultPHTTP, resultClear, resultPacketPath, resultPipelined}
	for _, r := range transplant.Reasons() {
		out = append(out, r.String())
	}
	return out
}

// deliverable says whether a connection may go to the web server's own
// socket under the FE's cluster frame c (nil before the first), or the
// fallback reason, without the BE's packet path (bh.go, which lets multi
// through once it holds its queue). The server serves every later request
// of a delivered connection, which is what phttp = single does; with
// multi or forward that is right only while every server the FE names is
// this BE.
func deliverable(c *beCluster, self netip.Addr) string {
	if c == nil || c.phttp == wire.PHTTPSingle {
		return ""
	}
	for _, s := range c.sched.Servers() {
		if s.Addr != self {
			return resultPHTTP
		}
	}
	return ""
}

// retryable tells whether a failed Stage left the idle connection merely
// stale (the server closed it: a reload, a timeout), so that another one
// may be tried for the same handoff.
func retryable(err error) bool {
	var e *transplant.Error
	if !errors.As(err, &e) || e.Server != transplant.ServerIntact {
		return false
	}
	return e.Reason == transplant.ReasonWorkerGone || e.Reason == transplant.ReasonFDChanged
}

// deliverer owns the server handle, the ready idle connections and the
// counters.
type deliverer struct {
	srv *transplant.Server
	log *slog.Logger
	// transparent: each connection dials the server from the client's
	// address and port (clientaddr = on), so none is prepared ahead.
	transparent bool
	// eligible is deliverable on the BE's current cluster frame.
	eligible func() string
	// relay is the fallback: a connection to the server for the relay
	// (a pooled one for HTTP, the client's own for TLS).
	relay func(ctx context.Context, ci *wire.ConnInfo) (handoff.Upstream, error)
	// restore, if set, is what the server's socket is given for ci (TLS
	// with proxyprotocol: a PROXY header ahead of the ClientHello); the
	// relay's fallback still rebuilds ci itself.
	restore func(ci *wire.ConnInfo) *wire.ConnInfo
	// wanted, if set, tells whether connections are worth keeping ready
	// now (TLS: only while an FE has a TLS port).
	wanted func() bool
	// clear clears an earlier socket of ci's 4-tuple out of the way.
	clear func(ci *wire.ConnInfo) error
	// track, if set, has the BE's packet path follow a staged
	// connection's later requests; done tells it how the handoff ended.
	track  func(ci *wire.ConnInfo) error
	done   func(client netip.AddrPort, delivered bool)
	metric *prometheus.CounterVec

	ready chan readyIdle
	kick  chan struct{}
	// pausedUntil (unix nanoseconds) and pauseReason: after a failed
	// preparation, connections fall back at once until then.
	pausedUntil atomic.Int64
	pauseReason atomic.Value // string
	failures    atomic.Int32 // preparations failed in a row

	mu     sync.Mutex
	counts map[string]int64
	closed bool
}

type readyIdle struct {
	idle *transplant.Idle
	at   time.Time
}

func newDeliverer(server netip.AddrPort, transparent bool, log *slog.Logger, metric *prometheus.CounterVec) *deliverer {
	d := &deliverer{
		srv: transplant.NewServer(server), transparent: transparent, log: log, metric: metric,
		ready: make(chan readyIdle, readyIdles), kick: make(chan struct{}, 1),
		counts: map[string]int64{},
	}
	if metric != nil {
		for _, r := range DeliverResults() {
			metric.WithLabelValues(r)
		}
	}
	return d
}

func (d *deliverer) count(result string) {
	d.mu.Lock()
	d.counts[result]++
	d.mu.Unlock()
	if d.metric != nil {
		d.metric.WithLabelValues(result).Inc()
	}
}

// Counts returns the deliveries by result.
func (d *deliverer) Counts() map[string]int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]int64, len(d.counts))
	for k, v := range d.counts {
		out[k] = v
	}
	return out
}

// run keeps readyIdles connections ready until ctx ends, renewing those
// that grew old, then closes them.
func (d *deliverer) run(ctx context.Context) {
	defer d.close()
	if d.transparent {
		<-ctx.Done()
		return
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		d.evict(time.Now())
		d.fill(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.kick:
		}
	}
}

// fill prepares connections until the ready set is full or a preparation
// fails (then it pauses inline preparations too).
func (d *deliverer) fill(ctx context.Context) {
	for len(d.ready) < cap(d.ready) && ctx.Err() == nil && (d.wanted == nil || d.wanted()) {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		idle, err := d.srv.Prepare(pctx)
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				d.failed(err)
				d.log.Debug("no idle server connection prepared", "op", "deliver", "err", err)
			}
			return
		}
		d.failures.Store(0)
		select {
		case d.ready <- readyIdle{idle: idle, at: time.Now()}:
		default:
			idle.Close()
			return
		}
	}
}

// failed records a failed preparation, and pauses preparations when
// shouldPause says so.
func (d *deliverer) failed(err error) {
	r := transplant.ReasonOf(err)
	if r == 0 {
		r = transplant.ReasonDial
	}
	if shouldPause(r, int(d.failures.Add(1)), d.transparent) {
		d.pauseReason.Store(r.String())
		d.pausedUntil.Store(time.Now().Add(failedPause).UnixNano())
	}
}

// shouldPause tells whether a preparation's failure for r, the n-th in a
// row, pauses the next ones. A dial from a client's address fails for that
// client alone (its port, a lost SYN), so it pauses only when repeated.
func shouldPause(r transplant.Reason, n int, transparent bool) bool {
	switch r {
	case transplant.ReasonDial:
		return !transparent || n >= pauseAfter
	case transplant.ReasonNoWorker, transplant.ReasonDenied, transplant.ReasonDeferred:
		return true
	}
	return n >= pauseAfter
}

// evict closes the ready connections older than idleMaxAge.
func (d *deliverer) evict(now time.Time) {
	for range len(d.ready) {
		select {
		case r := <-d.ready:
			if now.Sub(r.at) > idleMaxAge {
				r.idle.Close()
				continue
			}
			select {
			case d.ready <- r:
			default:
				r.idle.Close()
			}
		default:
			return
		}
	}
}

// take returns a fresh idle connection: one dialed now from client's
// address (transparent), a ready one, or one prepared now.
func (d *deliverer) take(ctx context.Context, client netip.AddrPort) (*transplant.Idle, error) {
	if d.transparent {
		return d.prepareNow(ctx, client)
	}
	defer func() {
		select {
		case d.kick <- struct{}{}:
		default:
		}
	}()
	for {
		select {
		case r := <-d.ready:
			if time.Since(r.at) > idleMaxAge {
				r.idle.Close()
				continue
			}
			return r.idle, nil
		default:
		}
		break
	}
	return d.prepareNow(ctx, netip.AddrPort{})
}

// prepareNow prepares an idle connection on the handoff's path, from
// client's address if it is valid, unless preparations are paused.
func (d *deliverer) prepareNow(ctx context.Context, client netip.AddrPort) (*transplant.Idle, error) {
	if time.Now().UnixNano() < d.pausedUntil.Load() {
		reason, _ := d.pauseReason.Load().(string)
		return nil, &pausedError{reason: reason}
	}
	ctx, cancel := context.WithTimeout(ctx, inlineWait)
	defer cancel()
	var idle *transplant.Idle
	var err error
	if client.IsValid() {
		idle, err = d.srv.PrepareFrom(ctx, client, netif.TransparentMark)
	} else {
		idle, err = d.srv.Prepare(ctx)
	}
	if err != nil {
		d.failed(err)
		return nil, err
	}
	d.failures.Store(0)
	return idle, nil
}

// pausedError is a fallback without a try: a preparation failed a moment
// ago for reason.
type pausedError struct{ reason string }

func (e *pausedError) Error() string {
	return "server connections failed to prepare a moment ago (" + e.reason + ")"
}

func reasonOf(err error) string {
	var p *pausedError
	if errors.As(err, &p) {
		return p.reason
	}
	if r := transplant.ReasonOf(err); r != 0 {
		return r.String()
	}
	return transplant.ReasonDial.String()
}

func (d *deliverer) close() {
	d.mu.Lock()
	d.closed = true
	d.mu.Unlock()
	for {
		select {
		case r := <-d.ready:
			r.idle.Close()
		default:
			d.srv.Close()
			return
		}
	}
}

// connect is the receiver's Connect for an HTTP connection: a delivery
// holding an idle server connection, or, when the connection may not or
// cannot be delivered, the relay's upstream (counted).
func (d *deliverer) connect(ctx context.Context, ci *wire.ConnInfo) (handoff.Upstream, error) {
	if why := d.eligible(); why != "" {
		d.count(why)
		return d.relayUpstream(ctx, ci)
	}
	idle, err := d.take(ctx, ci.Client)
	if err != nil {
		why := reasonOf(err)
		d.count(why)
		d.log.Info("connection relayed: no idle server connection", "op", "deliver", "client", ci.Client.String(),
			"reason", why, "err", err)
		return d.relayUpstream(ctx, ci)
	}
	return &delivery{d: d, idle: idle}, nil
}

// relayUpstream is d.relay as a handoff.Upstream (no typed nil).
func (d *deliverer) relayUpstream(ctx context.Context, ci *wire.ConnInfo) (handoff.Upstream, error) {
	up, err := d.relay(ctx, ci)
	if err != nil {
		return nil, err
	}
	return up, nil
}

// delivery is one connection's way to the web server's socket: the
// handoff.Upstream the receiver holds from the offer to Run, and, once
// staged, the handoff.Rebuilt it activates or discards. After a fallback
// it holds the relay's upstream instead.
type delivery struct {
	d       *deliverer
	idle    *transplant.Idle
	staged  *transplant.Staged
	ci      *wire.ConnInfo
	rb      handoff.Rebuilder
	relayUp handoff.Upstream
}

// Deliver stages ci on the idle connection's server socket (trying
// another idle connection when the server closed this one), or falls back
// to the relay.
func (c *delivery) Deliver(ci *wire.ConnInfo, rb handoff.Rebuilder) (handoff.Rebuilt, error) {
	c.ci, c.rb = ci, rb
	if err := c.d.clear(ci); err != nil {
		return c.fallBack(resultClear, err)
	}
	for try := 1; ; try++ {
		st, err := c.idle.Stage(c.d.restored(ci))
		if err == nil {
			c.staged = st
			return c.follow()
		}
		c.idle.Close()
		c.idle = nil
		// A transparent dial is fresh: its failure is no stale
		// connection, and another from the same port would meet the
		// first's TIME_WAIT.
		if !retryable(err) || try == stageTries || c.d.transparent {
			return c.fallBack(reasonOf(err), err)
		}
		c.d.log.Debug("idle server connection closed by the server; taking another", "op", "deliver",
			"client", ci.Client.String(), "err", err)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c.idle, err = c.d.take(ctx, ci.Client)
		cancel()
		if err != nil {
			return c.fallBack(reasonOf(err), err)
		}
	}
}

// fallBack counts why, gets the relay's upstream and rebuilds the client
// connection for the relay.
func (c *delivery) fallBack(why string, cause error) (handoff.Rebuilt, error) {
	c.d.count(why)
	c.d.log.Info("connection relayed: not delivered to the web server's socket", "op", "deliver",
		"client", c.ci.Client.String(), "reason", why, "err", cause)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	up, err := c.d.relay(ctx, c.ci)
	if err != nil {
		return nil, fmt.Errorf("deliver %v: fall back to the relay: %w", c.ci.Client, err)
	}
	c.relayUp = up
	return c.rb.Rebuild(c.ci)
}

// restored is what the server's socket is given for ci.
func (d *deliverer) restored(ci *wire.ConnInfo) *wire.ConnInfo {
	if d.restore == nil {
		return ci
	}
	return d.restore(ci)
}

// Activate gives the staged connection to the server (the FE committed).
// Should that fail, the socket was taken off the client's connection
// without a packet, and the connection is rebuilt for the relay; the FE
// forwards the client's packets already, so one arriving in between is
// answered with a reset (a narrow window, counted under its reason).
func (c *delivery) Activate() (*net.TCPConn, error) {
	// ESTABLISHED before the server sees the socket: it answers at once,
	// and the client's FIN may come back before Commit returns.
	c.ended(true)
	err := c.staged.Commit()
	if err != nil {
		c.ended(false)
	}
	if err == nil {
		c.d.count(resultDelivered)
		return nil, nil
	}
	rb, ferr := c.fallBack(reasonOf(err), err)
	if ferr != nil {
		return nil, ferr
	}
	return rb.Activate()
}

// Discard takes the staged connection off the server's socket.
func (c *delivery) Discard() {
	c.ended(false)
	if err := c.staged.Abort(); err != nil {
		c.d.log.Warn("staged connection not taken back cleanly", "op", "deliver", "client", c.ci.Client.String(), "err", err)
	}
}

// Close releases what the delivery holds (the receiver calls it only when
// the handoff failed).
func (c *delivery) Close() error {
	var errs []error
	if c.idle != nil {
		errs = append(errs, c.idle.Close())
	}
	if c.relayUp != nil {
		errs = append(errs, c.relayUp.Close())
	}
	return errors.Join(errs...)
}

// relayed is the relay's upstream of a connection the receiver runs: nil
// when the web server owns the connection.
func relayed(up handoff.Upstream) handoff.Upstream {
	if c, ok := up.(*delivery); ok {
		if c.relayUp == nil {
			return nil
		}
		return c.relayUp
	}
	return up
}

// formatCounts writes deliveries as `tcphactl status` shows them:
// delivered first, then the fallback reasons seen, by name.
func formatCounts(m map[string]int64) string {
	var b strings.Builder
	fmt.Fprintf(&b, "delivered=%d", m[resultDelivered])
	var keys []string
	var fallbacks int64
	for k, v := range m {
		if k != resultDelivered && v > 0 {
			keys = append(keys, k)
			fallbacks += v
		}
	}
	sort.Strings(keys)
	fmt.Fprintf(&b, " relayed=%d", fallbacks)
	for _, k := range keys {
		fmt.Fprintf(&b, " relayed_%s=%d", k, m[k])
	}
	return b.String()
}

// vipPorts are the VIP ports (HTTP and TLS) of the FEs with a session to
// this BE.
func (b *BE) vipPorts() []uint16 {
	var out []uint16
	for _, s := range b.server.Sessions() {
		for _, p := range []uint16{s.Peer.VIP.Port(), s.Peer.TLSPort} {
			if p != 0 && !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
	}
	return out
}

// waitDelivered waits until no connection is left on the VIP's ports, or
// until: the web server holds the delivered ones, and the stop that
// follows removes the VIP they are bound to.
func (b *BE) waitDelivered(ports []uint16, until time.Time) {
	for {
		n := 0
		for _, p := range ports {
			flows, err := netif.HeldTCP(netip.AddrPortFrom(b.cfg.VAddr, p))
			if err != nil {
				b.log.Warn("delivered connections not counted; not waiting for them", "op", "stop", "err", err)
				return
			}
			n += len(flows)
		}
		if n == 0 {
			return
		}
		if time.Now().After(until) {
			b.log.Warn("drain time over; cutting the web server's delivered connections", "op", "stop", "connections", n)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// resetDelivered resets the web server's connection with client on a VIP
// port (an FE that leaves it asks for a RST to the client): SOCK_DESTROY
// aborts it, which sends the RST (tcp_abort), and the server reads an
// error and closes its fd.
func (b *BE) resetDelivered(client netip.AddrPort) bool {
	for _, p := range b.vipPorts() {
		vip := netip.AddrPortFrom(b.cfg.VAddr, p)
		sk, err := netif.LookupTCP(vip, client)
		if err != nil {
			continue
		}
		if err := netif.DestroyTCP(vip, client, sk); err != nil {
			b.log.Warn("delivered connection not reset", "op", "reset", "client", client.String(), "err", err)
			return false
		}
		return true
	}
	return false
}
