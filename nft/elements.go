package nft

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
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
}

type editKind int

const (
	editAdd editKind = iota
	editDelete
	// editDeleteMaybe deletes an element that may be missing (expired, or
	// never added by the packet path): adding it first makes the delete
	// valid, since a failed delete aborts the whole batch (FACTS.md).
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
	read  func(*nftables.Conn) error
	done  chan error
}

// maxGroup bounds how many requests share one transaction; very large
// batches can hit ENOBUFS (FACTS.md).
const maxGroup = 128

// NewFlows returns the owner of rs's sets on conn. Call Run before use.
func NewFlows(conn *nftables.Conn, rs *Ruleset) *Flows {
	return &Flows{conn: conn, rs: rs, reqs: make(chan *request), stop: make(chan struct{})}
}

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
		group := []*request{first}
	drain:
		for len(group) < maxGroup {
			select {
			case r := <-f.reqs:
				if r.read != nil {
					// Reads see the edits queued before them.
					f.commit(group)
					group = nil
					r.done <- r.read(f.conn)
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
	for _, r := range group {
		f.queue(r.edits)
	}
	err := f.conn.Flush()
	if err == nil || len(group) == 1 {
		for _, r := range group {
			r.done <- err
		}
		return
	}
	for _, r := range group {
		f.queue(r.edits)
		r.done <- f.conn.Flush()
	}
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
			f.conn.SetAddElements(s, el)
			f.conn.SetDeleteElements(s, el)
		}
	}
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

// Block starts HANDOFFING for flow: its packets are dropped until Forward or
// Unblock.
func (f *Flows) Block(ctx context.Context, flow netip.AddrPort) error {
	if err := f.do(ctx, &request{edits: []edit{{editAdd, SetBlock, flow, netip.Addr{}}}}); err != nil {
		return fmt.Errorf("block %v: %w", flow, err)
	}
	return nil
}

// Unblock ends HANDOFFING without a handoff: the FE serves the flow itself.
func (f *Flows) Unblock(ctx context.Context, flow netip.AddrPort) error {
	if err := f.do(ctx, &request{edits: []edit{{editDelete, SetBlock, flow, netip.Addr{}}}}); err != nil {
		return fmt.Errorf("unblock %v: %w", flow, err)
	}
	return nil
}

// Forward makes flow HANDOFFED: its packets go to be from now on. replace
// says a forwarding entry for the same flow (a previous connection from the
// same client port) is still installed and must go.
func (f *Flows) Forward(ctx context.Context, flow netip.AddrPort, be netip.Addr, replace bool) error {
	var edits []edit
	if replace {
		edits = append(edits, edit{editDelete, MapForward, flow, netip.Addr{}})
	}
	edits = append(edits,
		edit{editAdd, MapForward, flow, be},
		// Tolerant: a BE-driven re-forward (multi-handoff) never blocked.
		edit{editDeleteMaybe, SetBlock, flow, netip.Addr{}},
		edit{editDeleteMaybe, SetFresh, flow, netip.Addr{}},
		edit{editDeleteMaybe, SetClosing, flow, netip.Addr{}},
	)
	if err := f.do(ctx, &request{edits: edits}); err != nil {
		return fmt.Errorf("forward %v to %v: %w", flow, be, err)
	}
	return nil
}

// Unforward removes flow's forwarding after its TIME_WAIT.
func (f *Flows) Unforward(ctx context.Context, flow netip.AddrPort) error {
	edits := []edit{
		{editDelete, MapForward, flow, netip.Addr{}},
		{editDeleteMaybe, SetClosing, flow, netip.Addr{}},
		{editDeleteMaybe, SetAlive, flow, netip.Addr{}},
	}
	if err := f.do(ctx, &request{edits: edits}); err != nil {
		return fmt.Errorf("unforward %v: %w", flow, err)
	}
	return nil
}

// Members lists the flows in one of the FE's sets or maps; for the forward
// map the value is the BE address.
func (f *Flows) Members(ctx context.Context, set string) (map[netip.AddrPort]netip.Addr, error) {
	out := map[netip.AddrPort]netip.Addr{}
	s := f.rs.Set(set)
	if s == nil {
		return nil, fmt.Errorf("list %s: no such set", set)
	}
	err := f.do(ctx, &request{read: func(c *nftables.Conn) error {
		els, err := c.GetSetElements(s)
		if err != nil {
			return err
		}
		for _, el := range els {
			k, err := ParseKey(el.Key)
			if err != nil {
				return err
			}
			var v netip.Addr
			if len(el.Val) == 4 {
				v = netip.AddrFrom4([4]byte(el.Val))
			}
			out[k] = v
		}
		return nil
	}})
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", set, err)
	}
	return out, nil
}
