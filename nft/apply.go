package nft

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// Apply installs rs, replacing any table of the same family and name in the
// same transaction: add, delete, add is atomic whether or not the table
// existed (FACTS.md), so packets never see a half-built table.
func Apply(c *nftables.Conn, rs *Ruleset) error {
	c.AddTable(rs.Table)
	c.DelTable(rs.Table)
	c.AddTable(rs.Table)
	for _, ch := range rs.Chains {
		c.AddChain(ch)
	}
	ids := map[string]uint32{}
	for _, s := range rs.Sets {
		if err := c.AddSet(s, rs.Init[s.Name]); err != nil {
			return fmt.Errorf("install %s table: add set %s: %w", family(rs.Table), s.Name, err)
		}
		ids[s.Name] = s.ID
	}
	for _, r := range rs.Rules {
		// Sets created in this transaction are not visible by name yet; the
		// kernel finds them by their transaction ID.
		for _, e := range r.Exprs {
			switch e := e.(type) {
			case *expr.Lookup:
				e.SetID = ids[e.SetName]
			case *expr.Dynset:
				e.SetID = ids[e.SetName]
			}
		}
		c.AddRule(r)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install %s table: %w", family(rs.Table), err)
	}
	return nil
}

// QueuePreference is the order in which InstallFE tries the queue modes:
// the native expression where the kernel has nft_queue (distro kernels ship
// it as a module), else the xtables target through nft_compat (this
// project's kernel, FACTS.md).
var QueuePreference = []QueueMode{QueueNative, QueueCompat}

// Installed is what InstallFE put in the kernel.
type Installed struct {
	Ruleset *Ruleset
	Queue   QueueMode
	// Refused says why the modes tried before Queue were refused; nil when
	// the first was taken.
	Refused error
}

// InstallFE installs the FE's table for p, with init's elements (the flows
// carried from a predecessor), using the first of modes whose rule the
// kernel takes; p.Queue is ignored. A kernel without nft_queue refuses the
// native expression only when the batch is committed ("no such file or
// directory"), and the refused transaction leaves nothing behind, so the
// next mode is tried on its own.
func InstallFE(c *nftables.Conn, p FEParams, init map[string][]nftables.SetElement, modes []QueueMode) (Installed, error) {
	var refused []error
	for _, mode := range modes {
		p.Queue = mode
		rs := FE(p)
		for name, els := range init {
			if rs.Init == nil {
				rs.Init = map[string][]nftables.SetElement{}
			}
			rs.Init[name] = els
		}
		if err := Apply(c, rs); err != nil {
			refused = append(refused, fmt.Errorf("with the %v: %w", mode, err))
			continue
		}
		return Installed{Ruleset: rs, Queue: mode, Refused: errors.Join(refused...)}, nil
	}
	if len(refused) == 0 {
		return Installed{}, errors.New("install the FE's table: no queue mode to try")
	}
	return Installed{}, errors.Join(refused...)
}

// Remove deletes tcpha's table of t's family, if it is there.
func Remove(c *nftables.Conn, t *nftables.Table) error {
	c.AddTable(t) // makes the delete valid when the table is missing
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("remove %s table: %w", family(t), err)
	}
	return nil
}

// Exists tells whether tcpha's table of t's family is installed.
func Exists(c *nftables.Conn, t *nftables.Table) (bool, error) {
	tables, err := c.ListTablesOfFamily(t.Family)
	if err != nil {
		return false, fmt.Errorf("list %s tables: %w", family(t), err)
	}
	for _, x := range tables {
		if x.Name == t.Name {
			return true, nil
		}
	}
	return false, nil
}

func family(t *nftables.Table) string {
	switch t.Family {
	case nftables.TableFamilyIPv4:
		return "ip " + t.Name
	case nftables.TableFamilyARP:
		return "arp " + t.Name
	case nftables.TableFamilyNetdev:
		return "netdev " + t.Name
	}
	return fmt.Sprintf("family(%d) %s", t.Family, t.Name)
}

// Key encodes a client flow as the sets' key: ipv4_addr . inet_service,
// each field padded to 4 bytes.
func Key(ap netip.AddrPort) []byte {
	a := ap.Addr().As4()
	return []byte{a[0], a[1], a[2], a[3], byte(ap.Port() >> 8), byte(ap.Port()), 0, 0}
}

// ParseKey decodes a set key written by Key.
func ParseKey(b []byte) (netip.AddrPort, error) {
	if len(b) != 8 {
		return netip.AddrPort{}, errors.New("flow key: want 8 bytes")
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[:4])), uint16(b[4])<<8|uint16(b[5])), nil
}

// Carried are the per-flow elements an agent takes over from the table its
// predecessor left: HANDOFFED flows, those already closing, and the fresh
// marks of new connections on client ports still forwarded. Flows that
// were HANDOFFING died with the predecessor's sockets and are not carried.
type Carried struct {
	Found   bool // a table was installed
	Forward map[netip.AddrPort]netip.Addr
	Closing map[netip.AddrPort]bool
	// Fresh keeps a connection that reused a forwarded port local: without
	// its mark, its packets would go to the earlier connection's BE until
	// its handoff replaces the forwarding.
	Fresh map[netip.AddrPort]bool
}

// ReadCarried reads the forward map and closing set of the installed FE
// table, if there is one. A table without them yields nothing.
func ReadCarried(c *nftables.Conn, t *nftables.Table) (*Carried, error) {
	out := &Carried{Forward: map[netip.AddrPort]netip.Addr{}, Closing: map[netip.AddrPort]bool{},
		Fresh: map[netip.AddrPort]bool{}}
	ok, err := Exists(c, t)
	if err != nil || !ok {
		return out, err
	}
	out.Found = true
	read := func(name string, fn func(k netip.AddrPort, v []byte)) error {
		s, err := c.GetSetByName(t, name)
		if err != nil {
			return nil // an older layout: nothing to carry
		}
		els, err := c.GetSetElements(s)
		if err != nil {
			return fmt.Errorf("read %s: %w", name, err)
		}
		for _, el := range els {
			if k, err := ParseKey(el.Key); err == nil {
				fn(k, el.Val)
			}
		}
		return nil
	}
	err = read(MapForward, func(k netip.AddrPort, v []byte) {
		if len(v) == 4 {
			out.Forward[k] = netip.AddrFrom4([4]byte(v))
		}
	})
	if err == nil {
		err = read(SetClosing, func(k netip.AddrPort, _ []byte) { out.Closing[k] = true })
	}
	if err == nil {
		err = read(SetFresh, func(k netip.AddrPort, _ []byte) { out.Fresh[k] = true })
	}
	return out, err
}

// Init returns the elements that install carried in a new FE ruleset.
func (cr *Carried) Init() map[string][]nftables.SetElement {
	init := map[string][]nftables.SetElement{}
	for k, be := range cr.Forward {
		init[MapForward] = append(init[MapForward], nftables.SetElement{Key: Key(k), Val: be.AsSlice()})
		if cr.Closing[k] {
			init[SetClosing] = append(init[SetClosing], nftables.SetElement{Key: Key(k)})
		}
		// A fresh mark matters only while the port is forwarded.
		if cr.Fresh[k] {
			init[SetFresh] = append(init[SetFresh], nftables.SetElement{Key: Key(k)})
		}
	}
	return init
}
