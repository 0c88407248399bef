package nft

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Flows changes the FE's per-flow sets and maps. One goroutine (Run) owns
// the nftables connection; callers send it requests. Edits that queue up
// while a transaction is in flight are committed together in the next one
// (group commit): each nft transaction costs 40-100 µs alone and
// milliseconds under load, and a handoff needs two (FACTS.md).
type Flows struct {
	conn *nftables.Conn
	rs   *Ruleset
	reqs chan *request
	stop chan struct{}
	// destroy says the kernel has NFT_MSG_DESTROYSETELEM (Linux 6.3), a
	// delete that does not fail when the element is already gone.
	destroy bool
}

type editKind int

const (
	editAdd editKind = iota
	editDelete
	// editDeleteMaybe deletes an element that may be missing (expired, or
	// never added by the packet path). A failed delete aborts the whole
	// batch (FACTS.md), so it is a destroy where the kernel has one; where
	// it has not, an add followed by a delete in a set, and in a map a
	// delete if a look-up finds the element (Flows.resolve).
	editDeleteMaybe
)

type edit struct {
	kind editKind
	set  string
	key  netip.AddrPort
	val  netip.Addr // map data, for forward
}

type request struct {
	edits []edit
	// cond, if set, is asked by the owner when it takes the request: false
	// skips the edits (ErrSkipped). Edits of one flow go through the owner
	// in order, so a condition on the connection table is checked after
	// every edit queued before it.
	cond func() bool
	read func(*nftables.Conn) error
	// install replaces the table (Reinstall).
	install func(*nftables.Conn) (*Ruleset, error)
	done    chan error
}

// ErrSkipped is returned for a conditional edit whose condition no longer
// held.
var ErrSkipped = errors.New("edit skipped: its condition no longer holds")

// maxGroup bounds how many requests share one transaction; very large
// batches can hit ENOBUFS (FACTS.md).
const maxGroup = 128

// NewFlows returns the owner of rs's sets on conn. Call Run before use.
func NewFlows(conn *nftables.Conn, rs *Ruleset) *Flows {
	f := &Flows{conn: conn, rs: rs, reqs: make(chan *request), stop: make(chan struct{})}
	f.destroy = f.probeDestroy()
	return f
}

// probeDestroy destroys an element that is not there: kernels since 6.3
// accept it, older ones refuse the message.
func (f *Flows) probeDestroy() bool {
	for _, s := range f.rs.Sets {
		if !s.IsMap && s.KeyType == keyType {
			f.conn.SetDestroyElements(s, []nftables.SetElement{{Key: Key(netip.AddrPortFrom(netip.IPv4Unspecified(), 0))}})
			return f.conn.Flush() == nil
		}
	}
	return false
}

// Destroy tells whether element removals use NFT_MSG_DESTROYSETELEM.
func (f *Flows) Destroy() bool { return f.destroy }

// Run serves requests until ctx is done.
func (f *Flows) Run(ctx context.Context) {
	defer close(f.stop)
	for {
		var first *request
		select {
		case <-ctx.Done():
			return
		case first = <-f.reqs:
		}
		if first.read != nil {
			first.done <- first.read(f.conn)
			continue
		}
		if first.install != nil {
			first.done <- f.reinstall(first.install)
			continue
		}
		group := []*request{first}
	drain:
		for len(group) < maxGroup {
			select {
			case r := <-f.reqs:
				if r.read != nil || r.install != nil {
					// Reads and reinstalls see the edits queued before
					// them.
					f.commit(group)
					group = nil
					if r.read != nil {
						r.done <- r.read(f.conn)
					} else {
						r.done <- f.reinstall(r.install)
					}
					break drain
				}
				group = append(group, r)
			default:
				break drain
			}
		}
		if len(group) > 0 {
			f.commit(group)
		}
	}
}

// commit applies a group of requests in one transaction. If it fails, one
// request's element was wrong (ENOENT, EEXIST) and the kernel aborted all of
// them: redo them one transaction each, so only the culprit fails.
func (f *Flows) commit(group []*request) {
	kept := group[:0]
	for _, r := range group {
		if r.cond != nil && !r.cond() {
			r.done <- ErrSkipped
			continue
		}
		kept = append(kept, r)
	}
	group = kept
	if len(group) == 0 {
		return
	}
	queued := f.queueAll(group)
	if len(queued) == 0 {
		return
	}
	err := f.conn.Flush()
	if err == nil || len(queued) == 1 {
		for _, r := range queued {
			r.done <- err
		}
		return
	}
	for _, r := range queued {
		if len(f.queueAll([]*request{r})) == 1 {
			r.done <- f.conn.Flush()
		}
	}
}

// queueAll queues the edits of group for one transaction and returns the
// requests queued; one whose edits could not be resolved gets its error.
func (f *Flows) queueAll(group []*request) []*request {
	var (
		queued []*request
		in     = inBatch{}
	)
	for _, r := range group {
		edits, err := f.resolve(f.present(r.edits), in)
		if err != nil {
			r.done <- err
			continue
		}
		f.queue(edits)
		queued = append(queued, r)
	}
	return queued
}

// present drops the edits of sets the table does not have: the placing
// table (FEPlace) has no fresh set, and a flow switched there has no fresh
// mark to lose.
func (f *Flows) present(edits []edit) []edit {
	out := edits[:0:0]
	for _, e := range edits {
		if f.rs.Set(e.set) != nil {
			out = append(out, e)
		}
	}
	return out
}

// inBatch is whether a map element will be there when the next edit of the
// transaction runs, for the elements the transaction edits.
type inBatch map[string]map[netip.AddrPort]bool

// resolve turns the removals of map elements that may be missing into a
// plain delete or nothing, on kernels without NFT_MSG_DESTROYSETELEM. Their
// add-then-delete cannot serve a map: an element added without its data is
// refused (EINVAL), and one added with other data than the element there
// too (EEXIST). So the owner looks the element up: only it edits the
// forward map, whose elements never expire, so the answer holds until the
// transaction, given the edits queued before in the same one.
func (f *Flows) resolve(edits []edit, in inBatch) ([]edit, error) {
	if f.destroy {
		return edits, nil
	}
	out := make([]edit, 0, len(edits))
	for _, e := range edits {
		s := f.rs.Set(e.set)
		if !s.IsMap {
			out = append(out, e)
			continue
		}
		if in[e.set] == nil {
			in[e.set] = map[netip.AddrPort]bool{}
		}
		switch e.kind {
		case editAdd:
			in[e.set][e.key] = true
		case editDelete:
			in[e.set][e.key] = false
		case editDeleteMaybe:
			there, known := in[e.set][e.key]
			if !known {
				_, err := f.conn.FindSetElements(s, []nftables.SetElement{{Key: Key(e.key)}})
				switch {
				case err == nil:
					there = true
				case errors.Is(err, unix.ENOENT):
				default:
					return nil, fmt.Errorf("look up %v in %s: %w", e.key, e.set, err)
				}
			}
			if !there {
				continue
			}
			e.kind = editDelete
			in[e.set][e.key] = false
		}
		out = append(out, e)
	}
	return out, nil
}

func (f *Flows) queue(edits []edit) {
	for _, e := range edits {
		s := f.rs.Set(e.set)
		el := []nftables.SetElement{{Key: Key(e.key)}}
		if s.IsMap {
			el[0].Val = e.val.AsSlice()
		}
		switch e.kind {
		case editAdd:
			f.conn.SetAddElements(s, el)
		case editDelete:
			f.conn.SetDeleteElements(s, el)
		case editDeleteMaybe:
			if f.destroy {
				f.conn.SetDestroyElements(s, el)
			} else {
				// A set element: adding it first makes the delete valid
				// whether or not it was there (maps were resolved above).
				f.conn.SetAddElements(s, el)
				f.conn.SetDeleteElements(s, el)
			}
		}
	}
}

func (f *Flows) reinstall(install func(*nftables.Conn) (*Ruleset, error)) error {
	rs, err := install(f.conn)
	if err != nil {
		return err
	}
	f.rs = rs
	return nil
}

// Reinstall replaces the table on the owner's goroutine with the ruleset
// install builds and applies, and edits the new one from then on. It runs
// after the edits queued before it and before those queued after it, so a
// handoff that switches a flow after the reinstall edits the new table.
// install must build a fresh ruleset: one applied before carries the
// kernel's handles.
func (f *Flows) Reinstall(ctx context.Context, install func(*nftables.Conn) (*Ruleset, error)) error {
	if err := f.do(ctx, &request{install: install}); err != nil {
		return fmt.Errorf("reinstall the table: %w", err)
	}
	return nil
}

// Exec runs fn on the owner's goroutine with the table as installed, in
// order with the edits queued before and after it: the placement's slot
// edits (EditPlacement), which add to the ruleset.
func (f *Flows) Exec(ctx context.Context, fn func(*nftables.Conn, *Ruleset) error) error {
	return f.do(ctx, &request{install: func(c *nftables.Conn) (*Ruleset, error) {
		if err := fn(c, f.rs); err != nil {
			return nil, err
		}
		return f.rs, nil
	}})
}

var errStopped = errors.New("nft flow owner stopped")

func (f *Flows) do(ctx context.Context, r *request) error {
	r.done = make(chan error, 1)
	select {
	case f.reqs <- r:
	case <-f.stop:
		return errStopped
	case <-ctx.Done():
		return ctx.Err()
	}
	// The owner always answers a request it took.
	return <-r.done
}

// Forward makes flow HANDOFFED: its packets go to be from now on. replace
// says a forwarding entry for the same flow (a previous connection from the
// same client port) is still installed and must go.
func (f *Flows) Forward(ctx context.Context, flow netip.AddrPort, be netip.Addr, replace bool) error {
	var edits []edit
	if replace {
		// The previous connection's entries: its BE and its closing mark.
		// Tolerant: the reaper may have removed them a moment ago.
		edits = append(edits, edit{editDeleteMaybe, MapForward, flow, netip.Addr{}})
	}
	// Any closing mark goes, replace or not: one left without its
	// forwarding would hide this connection's first FIN (issue 19).
	edits = append(edits, edit{editDeleteMaybe, SetClosing, flow, netip.Addr{}})
	edits = append(edits,
		edit{editAdd, MapForward, flow, be},
		// A SYN marks a flow fresh only while an earlier connection on its
		// port is forwarded, and that forwarding may have just ended: the
		// mark may be there without replace. Destroying a missing element
		// costs a lookup.
		edit{editDeleteMaybe, SetFresh, flow, netip.Addr{}},
	)
	if err := f.do(ctx, &request{edits: edits}); err != nil {
		return fmt.Errorf("forward %v to %v: %w", flow, be, err)
	}
	return nil
}

// Unforward removes flow's forwarding after its TIME_WAIT. Its closing
// mark goes too, or the next connection on the port would have its first
// FIN unseen, and so does its alive mark: left to expire on its own, it
// held every ended flow for idletimeout (15 min), and at a few hundred new
// connections a second the set filled up (issue 19).
func (f *Flows) Unforward(ctx context.Context, flow netip.AddrPort) error {
	return f.UnforwardIf(ctx, flow, nil)
}

// UnforwardIf is Unforward, made only if still() holds when the owner
// takes the request (nil: always): a new connection from the same client
// port may have been forwarded since the caller decided, and its
// forwarding must stay. It returns ErrSkipped when it did not hold.
func (f *Flows) UnforwardIf(ctx context.Context, flow netip.AddrPort, still func() bool) error {
	edits := []edit{
		{editDelete, MapForward, flow, netip.Addr{}},
		{editDeleteMaybe, SetClosing, flow, netip.Addr{}},
		{editDeleteMaybe, SetAlive, flow, netip.Addr{}},
	}
	if err := f.do(ctx, &request{edits: edits, cond: still}); err != nil {
		return fmt.Errorf("unforward %v: %w", flow, err)
	}
	return nil
}

// Remove deletes flow's forwarding and its marks, without failing if they
// are gone (the reaper's reconciliation), if still() holds when the owner
// takes the request.
func (f *Flows) Remove(ctx context.Context, flow netip.AddrPort, still func() bool) error {
	edits := []edit{
		{editDeleteMaybe, MapForward, flow, netip.Addr{}},
		{editDeleteMaybe, SetClosing, flow, netip.Addr{}},
		{editDeleteMaybe, SetAlive, flow, netip.Addr{}},
	}
	if err := f.do(ctx, &request{edits: edits, cond: still}); err != nil {
		return fmt.Errorf("remove %v: %w", flow, err)
	}
	return nil
}

// Reader reads the FE's per-flow sets on a netlink socket of its own, so
// that listing a large set never holds up the edits handoffs wait on: read
// through the owner, a dump of 200k elements delayed a handoff's commit by
// 6 s, and the BE dropped the rebuilt socket (issue 19). One goroutine owns
// a Reader.
//
// A dump on its own socket runs beside transactions, and the kernel only
// flags a dump that a transaction interrupted (NLM_F_DUMP_INTR), which the
// netlink library does not report: a dump may miss elements. So absence
// in a dump is a hint, and Has, a lookup of one element, is the answer.
//
// A Reader outlives a reinstall of the table (Flows.Reinstall): its
// requests name the table and sets by name, and a reinstall builds them
// from the same parameters.
type Reader struct {
	conn *nftables.Conn
	rs   *Ruleset
}

// NewReader returns a reader of rs's sets on conn, which nothing else
// uses.
func NewReader(conn *nftables.Conn, rs *Ruleset) *Reader { return &Reader{conn: conn, rs: rs} }

// Members lists the flows in one of the FE's sets or maps; for the forward
// map the value is the BE address. It may miss elements (see Reader).
func (r *Reader) Members(set string) (map[netip.AddrPort]netip.Addr, error) {
	s := r.rs.Set(set)
	if s == nil {
		return nil, fmt.Errorf("list %s: no such set", set)
	}
	els, err := r.conn.GetSetElements(s)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", set, err)
	}
	out := make(map[netip.AddrPort]netip.Addr, len(els))
	for _, el := range els {
		k, err := ParseKey(el.Key)
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", set, err)
		}
		var v netip.Addr
		if len(el.Val) == 4 {
			v = netip.AddrFrom4([4]byte(el.Val))
		}
		out[k] = v
	}
	return out, nil
}

// Has tells whether flow is in one of the FE's sets or maps now: one
// element's lookup (NFT_MSG_GETSETELEM without a dump), which the kernel
// answers with ENOENT for an element that is missing or timed out.
func (r *Reader) Has(set string, flow netip.AddrPort) (bool, error) {
	s := r.rs.Set(set)
	if s == nil {
		return false, fmt.Errorf("look up %v in %s: no such set", flow, set)
	}
	_, err := r.conn.FindSetElements(s, []nftables.SetElement{{Key: Key(flow)}})
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, unix.ENOENT):
		return false, nil
	}
	return false, fmt.Errorf("look up %v in %s: %w", flow, set, err)
}

// Get returns the BE flow is forwarded to now (ok false: none), by one
// element's lookup in the forward map, as Has.
func (r *Reader) Get(flow netip.AddrPort) (be netip.Addr, ok bool, err error) {
	s := r.rs.Set(MapForward)
	els, err := r.conn.FindSetElements(s, []nftables.SetElement{{Key: Key(flow)}})
	switch {
	case errors.Is(err, unix.ENOENT):
		return netip.Addr{}, false, nil
	case err != nil:
		return netip.Addr{}, false, fmt.Errorf("look up %v in %s: %w", flow, MapForward, err)
	}
	for _, el := range els {
		if len(el.Val) == 4 {
			return netip.AddrFrom4([4]byte(el.Val)), true, nil
		}
	}
	return netip.Addr{}, false, fmt.Errorf("look up %v in %s: the answer has no BE address", flow, MapForward)
}

// Forwarded returns what the FE's HANDOFFED rules have forwarded to BEs:
// packets and bytes, from their counters.
func (f *Flows) Forwarded(ctx context.Context) (packets, bytes uint64, err error) {
	err = f.do(ctx, &request{read: func(c *nftables.Conn) error {
		for _, ch := range f.rs.Chains {
			rules, err := c.GetRules(f.rs.Table, ch)
			if err != nil {
				return err
			}
			for _, r := range rules {
				if !strings.HasPrefix(ruleComment(r.UserData), "HANDOFFED") {
					continue
				}
				for _, e := range r.Exprs {
					if ctr, ok := e.(*expr.Counter); ok {
						packets += ctr.Packets
						bytes += ctr.Bytes
					}
				}
			}
		}
		return nil
	}})
	if err != nil {
		return 0, 0, fmt.Errorf("read counters: %w", err)
	}
	return packets, bytes, nil
}

// ruleComment decodes the comment comment() encoded.
func ruleComment(ud []byte) string {
	if len(ud) < 3 || ud[0] != 0 || int(ud[1])+2 > len(ud) {
		return ""
	}
	return strings.TrimRight(string(ud[2:2+int(ud[1])]), "\x00")
}
