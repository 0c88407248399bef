package be

// The kernel side of the packet path (bh.go): the @delivered set on the
// BE's netlink connection, the queue's binding, the table's install and
// guard, and the wiring into the deliverer and the BE's status.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"tcpha/admin"
	"tcpha/handoff"
	"tcpha/handoff/conntab"
	"tcpha/handoff/wire"
	"tcpha/netif"
	"tcpha/nft"
	"tcpha/phttp"
	"tcpha/queue"
	"tcpha/relay"
)

// nftFlowSet is @delivered on the BE's own lasting connection, one
// transaction per change, serialized.
type nftFlowSet struct {
	mu  sync.Mutex
	c   *nftables.Conn
	set *nftables.Set
}

func (s *nftFlowSet) Add(flow netip.AddrPort) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.c.SetAddElements(s.set, []nftables.SetElement{{Key: nft.Key(flow)}}); err != nil {
		return fmt.Errorf("add %v to @%s: %w", flow, s.set.Name, err)
	}
	if err := s.c.Flush(); err != nil {
		return fmt.Errorf("add %v to @%s: %w", flow, s.set.Name, err)
	}
	return nil
}

func (s *nftFlowSet) Remove(flow netip.AddrPort) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.c.SetDeleteElements(s.set, []nftables.SetElement{{Key: nft.Key(flow)}}); err != nil {
		return fmt.Errorf("remove %v from @%s: %w", flow, s.set.Name, err)
	}
	// Gone already (expired): nothing to do. The batch held only it.
	if err := s.c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %v from @%s: %w", flow, s.set.Name, err)
	}
	return nil
}

// follow has the BE's packet path follow a staged connection, or takes it
// off the server's socket again and falls back to the relay.
func (c *delivery) follow() (handoff.Rebuilt, error) {
	if c.d.track == nil {
		return c, nil
	}
	err := c.d.track(c.ci)
	if err == nil {
		return c, nil
	}
	if aerr := c.staged.Abort(); aerr != nil {
		return nil, fmt.Errorf("deliver %v: %w; and take it back: %w", c.ci.Client, err, aerr)
	}
	c.staged = nil
	why := resultPacketPath
	if errors.Is(err, errPipelined) {
		why = resultPipelined
	}
	return c.fallBack(why, err)
}

// ended tells the packet path how a staged connection's handoff ended.
func (c *delivery) ended(delivered bool) {
	if c.d.done != nil && c.ci != nil {
		c.d.done(c.ci.Client, delivered)
	}
}

// bhState is what the BE holds for its packet path.
type bhState struct {
	p      *bh
	set    *nftFlowSet
	owned  nft.Owned
	params nft.DeliveredParams // as installed
	stop   chan struct{}
	once   sync.Once
	// bound: the queue is this agent's; reader, under mu, its reader.
	bound  atomic.Bool
	mu     sync.Mutex
	reader *queue.Reader
}

// startBH installs the BE's delivered table, binds its queue and starts
// following delivered connections, whose handoffs it hears of from the
// deliverer. A connection is followed only under an FE with phttp =
// multi or forward: with single there is nothing to decide.
func (b *BE) startBH() error {
	st := &bhState{stop: make(chan struct{})}
	b.bh = st
	var err error
	if st.owned.Conn, err = nft.OpenLasting(); err != nil {
		return fmt.Errorf("packet path: %w", err)
	}
	// The set's backstop for a close the agent missed: longer than nginx
	// keeps an idle connection (keepalive_timeout, which keepalivetimeout
	// mirrors). Any packet of the flow refreshes it.
	idle := b.cfg.KeepAliveTimeout + time.Minute
	st.params = nft.DeliveredParams{VIP: b.cfg.VAddr, IdleTimeout: idle, Size: 65536, QueueNum: b.cfg.QueueNum}
	rs, mode, err := nft.InstallDelivered(st.owned.Conn, st.params, nft.QueuePreference)
	if err != nil {
		return fmt.Errorf("packet path: %w", err)
	}
	st.owned.Rules = rs
	st.params.Queue = mode
	set := &nftFlowSet{c: st.owned.Conn, set: rs.Set(nft.SetDelivered)}
	st.set = set
	st.p = newBH(b.log, b.cfg.MaxHeader, set, func(h *phttp.Head) bool {
		return relay.Decide(b.route(h.Host, h.Path)).Here
	})
	st.p.metric = b.m.BHPackets
	st.p.idle = idle
	st.p.alive = func(vip, client netip.AddrPort) bool {
		_, err := netif.LookupTCP(vip, client)
		return err == nil
	}
	st.p.mover = b.moveDelivered
	// With the packet path bound, phttp = multi no longer keeps a
	// connection from nginx: its later requests for other BEs move it.
	// (forward still does: a delivered connection's request cannot be
	// fetched from another BE's server.)
	b.deliver.eligible = func() string {
		if c := b.cluster.Load(); c != nil && c.phttp == wire.PHTTPMulti && st.bound.Load() {
			return ""
		}
		return deliverable(b.cluster.Load(), b.cfg.RAddr)
	}
	b.deliver.track = func(ci *wire.ConnInfo) error {
		if c := b.cluster.Load(); c == nil || c.phttp == wire.PHTTPSingle || !st.bound.Load() {
			return nil
		}
		return st.p.track(ci)
	}
	b.deliver.done = func(client netip.AddrPort, delivered bool) {
		if delivered {
			st.p.delivered(client)
		} else {
			st.p.untrack(client)
		}
	}
	// The queue: a predecessor handing over to this agent still holds
	// it (only one socket per namespace may bind a queue number), so
	// until it lets go, connections are delivered without being
	// followed, and the binding is tried again.
	go st.bind(b)
	go st.p.removeLoop(st.stop)
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-st.stop:
				return
			case <-t.C:
				st.p.reap()
			}
		}
	}()
	b.log.Info("delivered connections' table installed", "op", "start", "via", mode.String())
	return nil
}

// bind binds the queue, trying again every 100 ms while another socket
// holds it, until stop.
func (st *bhState) bind(b *BE) {
	warned := false
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		r, err := queue.OpenJudge(b.cfg.QueueNum, b.log, st.p.judge)
		if err == nil {
			st.mu.Lock()
			select {
			case <-st.stop:
				st.mu.Unlock()
				r.Close()
				return
			default:
			}
			st.reader = r
			st.mu.Unlock()
			st.bound.Store(true)
			b.log.Info("delivered connections' later requests read from NFQUEUE", "op", "start", "queue", b.cfg.QueueNum)
			return
		}
		if !warned {
			b.log.Warn("NFQUEUE for delivered connections not bound yet; delivering without following them", "op", "start",
				"queue", b.cfg.QueueNum, "err", err, "hint", "a predecessor handing over holds it; otherwise set [be] queuenum")
			warned = true
		}
		select {
		case <-st.stop:
			return
		case <-t.C:
		}
	}
}

// stopBH unbinds the queue and removes the delivered table (keep: leaves
// it for a successor, which replaces it). Delivered connections go on: the
// queue rules bypass a queue nobody reads. It is idempotent.
func (b *BE) stopBH(keep bool) error {
	st := b.bh
	if st == nil {
		return nil
	}
	var err error
	st.once.Do(func() {
		st.mu.Lock()
		close(st.stop)
		if st.reader != nil {
			st.reader.Close()
		}
		st.mu.Unlock()
		if st.set != nil {
			// The remover may be in a transaction on the same connection.
			st.set.mu.Lock()
			defer st.set.mu.Unlock()
		}
		if keep {
			st.owned.Keep()
		} else {
			err = st.owned.Remove()
		}
	})
	return err
}

// bhRows are the delivered connections the packet path follows, as
// `tcphactl conns` rows (state "ESTABLISHED delivered", WILLHANDOFF,
// TIME_WAIT).
func (b *BE) bhRows(now time.Time, flt admin.ConnFilter) []ConnRow {
	if b.bh == nil || b.bh.p == nil {
		return nil
	}
	var out []ConnRow
	for _, r := range b.bh.p.rows() {
		state := r.State.String()
		if !flt.Match(r.Client, netip.Addr{}, state) {
			continue
		}
		if r.State == conntab.Established {
			state += " delivered"
		}
		out = append(out, ConnRow{Client: r.Client.Addr().String(), ClientPort: r.Client.Port(), State: state,
			Age: now.Sub(r.Since).Truncate(time.Second).Seconds(), Requests: r.Requests})
	}
	return out
}

// guardBH keeps the delivered table installed (after `nft flush
// ruleset` every connection would otherwise fall back to the relay,
// reason packet-path); nil without it. The table's connection is shared
// with the set's changes, under the set's lock.
func (b *BE) guardBH() *nft.Guard {
	st := b.bh
	if st == nil || st.owned.Rules == nil {
		return nil
	}
	return &nft.Guard{
		Table: st.owned.Rules.Table, Want: nft.ShapeOf(st.owned.Rules), Every: guardEvery, Log: b.log,
		Reinstall: func(_ context.Context, found string) error {
			st.set.mu.Lock()
			defer st.set.mu.Unlock()
			if st.owned.Conn == nil {
				return errors.New("the delivered table is closed")
			}
			if err := nft.Apply(st.owned.Conn, nft.Delivered(st.params)); err != nil {
				return err
			}
			// The set came back empty: the connections followed until now
			// are the server's alone.
			st.p.forget()
			b.reinstalls.Add(time.Now(), found)
			b.m.TableReinstalls.WithLabelValues("ip").Inc()
			return nil
		},
	}
}

// bhMoves counts the delivered connections that moved (left) or whose
// move failed, for the status's moved and not_moved.
func (b *BE) bhMoves(left bool) int64 {
	if b.bh == nil || b.bh.p == nil {
		return 0
	}
	if left {
		return b.bh.p.moved.Load()
	}
	return b.bh.p.notMoved.Load()
}
