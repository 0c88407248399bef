package nft

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nlenc"
	"golang.org/x/sys/unix"
)

// Shape is what the guard compares of a table: whether it is there, its
// chains with their rule counts, and its sets by name. It is enough to see
// `nft flush ruleset` (the table gone), `nft flush table` (rules gone),
// `nft delete set` or a rule added by hand; it does not compare the rules'
// expressions, which nobody but us writes into our table.
type Shape struct {
	Exists bool
	Chains map[string]int // chain name → number of rules
	Sets   []string       // sorted
}

// ShapeOf is the shape rs has once installed.
func ShapeOf(rs *Ruleset) Shape {
	s := Shape{Exists: true, Chains: map[string]int{}}
	for _, c := range rs.Chains {
		s.Chains[c.Name] = 0
	}
	for _, r := range rs.Rules {
		s.Chains[r.Chain.Name]++
	}
	for _, set := range rs.Sets {
		s.Sets = append(s.Sets, set.Name)
	}
	slices.Sort(s.Sets)
	return s
}

// Diff says how found differs from want, in words for the log ("" when
// it does not).
func (want Shape) Diff(found Shape) string {
	if !found.Exists {
		return "table missing"
	}
	var out []string
	names := make([]string, 0, len(want.Chains))
	for n := range want.Chains {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		got, ok := found.Chains[n]
		switch {
		case !ok:
			out = append(out, "chain "+n+" missing")
		case got != want.Chains[n]:
			out = append(out, fmt.Sprintf("chain %s has %d rules, want %d", n, got, want.Chains[n]))
		}
	}
	var extra []string
	for n := range found.Chains {
		if _, ok := want.Chains[n]; !ok {
			extra = append(extra, n)
		}
	}
	slices.Sort(extra)
	for _, n := range extra {
		out = append(out, "unexpected chain "+n)
	}
	for _, n := range want.Sets {
		if !slices.Contains(found.Sets, n) {
			out = append(out, "set "+n+" missing")
		}
	}
	return strings.Join(out, "; ")
}

// Inspect reads the shape of the installed table t.
func Inspect(c *nftables.Conn, t *nftables.Table) (Shape, error) {
	s := Shape{Chains: map[string]int{}}
	ok, err := Exists(c, t)
	if err != nil || !ok {
		return s, err
	}
	s.Exists = true
	chains, err := c.ListChainsOfTableFamily(t.Family)
	if err != nil {
		return s, fmt.Errorf("list %s chains: %w", family(t), err)
	}
	for _, ch := range chains {
		if ch.Table.Name != t.Name {
			continue
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return s, fmt.Errorf("list %s chain %s: %w", family(t), ch.Name, err)
		}
		s.Chains[ch.Name] = len(rules)
	}
	sets, err := c.GetSets(t)
	if err != nil {
		return s, fmt.Errorf("list %s sets: %w", family(t), err)
	}
	for _, set := range sets {
		s.Sets = append(s.Sets, set.Name)
	}
	slices.Sort(s.Sets)
	return s, nil
}

// Message types of include/uapi/linux/netfilter/nf_tables.h that x/sys
// lacks: the destroy operations (Linux 6.3), notified under their own
// type.
const (
	nftMsgDestroyTable = 26
	nftMsgDestroyChain = 27
	nftMsgDestroyRule  = 28
	nftMsgDestroySet   = 29
)

// touches tells whether an NFNLGRP_NFTABLES notification of type typ (the
// low byte of the netlink message type) with payload data changes a
// table, chain, rule or set of table name in family fam. Set elements are
// left out: our own flow edits make those, thousands a second. The table
// name is attribute 1 of each of these messages (NFTA_TABLE_NAME,
// NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE), after the 4-byte
// struct nfgenmsg whose first byte is the family.
func touches(typ uint8, data []byte, fam nftables.TableFamily, name string) bool {
	switch typ {
	case unix.NFT_MSG_NEWTABLE, unix.NFT_MSG_DELTABLE, nftMsgDestroyTable,
		unix.NFT_MSG_NEWCHAIN, unix.NFT_MSG_DELCHAIN, nftMsgDestroyChain,
		unix.NFT_MSG_NEWRULE, unix.NFT_MSG_DELRULE, nftMsgDestroyRule,
		unix.NFT_MSG_NEWSET, unix.NFT_MSG_DELSET, nftMsgDestroySet:
	default:
		return false
	}
	if len(data) < 4 || nftables.TableFamily(data[0]) != fam {
		return false
	}
	ad, err := netlink.NewAttributeDecoder(data[4:])
	if err != nil {
		return false
	}
	for ad.Next() {
		if ad.Type() == 1 {
			return nlenc.String(ad.Bytes()) == name
		}
	}
	return false
}

// watchEvents calls kick for every notification that touches t, and when
// notifications were lost (ENOBUFS: the socket's buffer overflowed, as it
// may under a burst of element edits), until ctx ends. It returns an
// error when it cannot subscribe or the socket fails.
func watchEvents(ctx context.Context, t *nftables.Table, kick func()) error {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return fmt.Errorf("subscribe to nftables events: %w", err)
	}
	defer c.Close()
	if err := c.JoinGroup(unix.NFNLGRP_NFTABLES); err != nil {
		return fmt.Errorf("subscribe to nftables events: join NFNLGRP_NFTABLES: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	// Subscribed now: a change made before this went unseen.
	kick()
	for {
		msgs, err := c.Receive()
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, unix.ENOBUFS) {
			kick()
			continue
		}
		if err != nil {
			return fmt.Errorf("read nftables events: %w", err)
		}
		for _, m := range msgs {
			if uint16(m.Header.Type)>>8 != unix.NFNL_SUBSYS_NFTABLES {
				continue
			}
			if touches(uint8(m.Header.Type), m.Data, t.Family, t.Name) {
				kick()
			}
		}
	}
}

// Guard keeps a role's table installed: when an nftables notification
// touches the table (NFNLGRP_NFTABLES), and every Every as a backstop for
// lost notifications, it compares the table's shape with Want and calls
// Reinstall when they differ. Debian's /etc/nftables.conf begins with
// `flush ruleset`, so `systemctl reload nftables` removes every table, ours
// included (issue 17).
type Guard struct {
	Table *nftables.Table
	Want  Shape
	// WantNow, if set, is asked for the shape at each check instead of
	// Want: a table the agent extends while it runs (the placing table's
	// chains of new BEs).
	WantNow func() Shape
	// Reinstall puts the table back; found says what the check saw.
	Reinstall func(ctx context.Context, found string) error
	// Settled, if set, is called after each check that found the table
	// as wanted: a BE puts back a VIP it withdrew and could not restore.
	Settled func()
	// Every is the backstop check's interval.
	Every time.Duration
	Log   *slog.Logger
}

// Run guards the table until ctx ends. Its checks read on a netlink
// socket of their own; Reinstall goes to the table's owner.
func (g *Guard) Run(ctx context.Context) {
	conn, err := OpenLasting()
	if err != nil {
		g.Log.Error("table guard not started", "op", "nft", "err", err)
		return
	}
	defer conn.CloseLasting()
	kicks := make(chan struct{}, 1)
	kick := func() {
		select {
		case kicks <- struct{}{}:
		default:
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			if err := watchEvents(ctx, g.Table, kick); err != nil {
				// The periodic check goes on meanwhile.
				g.Log.Warn("nftables events lost; checking the table every interval only", "op", "nft", "err", err)
				select {
				case <-ctx.Done():
				case <-time.After(g.Every):
				}
			}
		}
	}()
	defer func() { <-done }()
	tick := time.NewTicker(g.Every)
	defer tick.Stop()
	// retry is armed after a failed check: the kernel does not notify
	// the removal of a table whose owner socket closed (an owner-flagged
	// table that was in our way), and the backstop is seconds away.
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	wait := guardRetry
	for {
		select {
		case <-ctx.Done():
			return
		case <-kicks:
		case <-tick.C:
		case <-retry.C:
		}
		if g.check(ctx, conn) {
			wait = guardRetry
			continue
		}
		retry.Reset(min(wait, g.Every))
		wait *= 2
	}
}

// guardRetry is how soon a check that could not put the table back runs
// again; the wait doubles with each failure, up to Every.
const guardRetry = 200 * time.Millisecond

// check compares the table with the wanted shape and reinstalls it when
// they differ; it reports whether the table is as wanted now.
func (g *Guard) check(ctx context.Context, conn *nftables.Conn) bool {
	found, err := Inspect(conn, g.Table)
	if err != nil {
		g.Log.Warn("table not checked", "op", "nft", "table", family(g.Table), "err", err)
		return false
	}
	want := g.Want
	if g.WantNow != nil {
		want = g.WantNow()
	}
	diff := want.Diff(found)
	if diff == "" {
		if g.Settled != nil {
			g.Settled()
		}
		return true
	}
	g.Log.Warn("our table changed under us: reinstalling it", "op", "nft", "table", family(g.Table), "found", diff)
	if err := g.Reinstall(ctx, diff); err != nil {
		g.Log.Error("table not reinstalled", "op", "nft", "table", family(g.Table), "err", err)
		return false
	}
	g.Log.Info("table reinstalled", "op", "nft", "table", family(g.Table))
	return true
}

// Reinstalls is a role's record of its guard's reinstalls, for `tcphactl
// status`. It is safe for concurrent use.
type Reinstalls struct {
	mu    sync.Mutex
	n     int64
	at    time.Time
	found string
}

// Add records a reinstall at at, after the check found found.
func (r *Reinstalls) Add(at time.Time, found string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n++
	r.at, r.found = at, found
}

// Last returns how many reinstalls there were, and when the last one was
// and what its check found.
func (r *Reinstalls) Last() (n int64, at time.Time, found string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n, r.at, r.found
}

// TableStatus is a role's table in `tcphactl status`: how many times the
// guard reinstalled it, when it last did (RFC 3339, "" never) and what
// that check found.
type TableStatus struct {
	Reinstalls    int64  `json:"reinstalls"`
	LastReinstall string `json:"last_reinstall"`
	LastFound     string `json:"last_found"`
}

// Status is r as `tcphactl status` shows it.
func (r *Reinstalls) Status() TableStatus {
	n, at, found := r.Last()
	st := TableStatus{Reinstalls: n, LastFound: found}
	if n > 0 {
		st.LastReinstall = at.Format(time.RFC3339)
	}
	return st
}

// Write writes the status line, only once there was a reinstall.
func (st TableStatus) Write(w io.Writer) {
	if st.Reinstalls == 0 {
		return
	}
	fmt.Fprintf(w, "  table reinstalls=%d last=%s found: %s\n", st.Reinstalls, st.LastReinstall, st.LastFound)
}
