package fe

import (
	"context"
	"net/netip"
	"time"

	"github.com/google/nftables"

	"tcpha/handoff/conntab"
	"tcpha/nft"
)

// guardEvery is the backstop check of the FE's table; nftables
// notifications wake the guard at once (nft.Guard).
const guardEvery = 5 * time.Second

// guard keeps the FE's table installed (issue 17: `nft flush ruleset`
// removed it, and every new request got a 503 while the handed-off
// connections were reset by the FE's own stack).
func (f *FE) guard() *nft.Guard {
	g := &nft.Guard{
		Table: f.owned.Rules.Table, Want: nft.ShapeOf(f.owned.Rules),
		Reinstall: f.reinstall, Every: guardEvery, Log: f.log,
	}
	if f.place != nil {
		g.WantNow = func() nft.Shape { return *f.place.shape.Load() }
	}
	return g
}

// reinstall builds the FE's table afresh, with the flows of the
// connection table, and installs it through the flow owner, which edits
// the new table from then on: a handoff whose switch was queued behind the
// reinstall forwards its flow in the new table.
func (f *FE) reinstall(ctx context.Context, found string) error {
	var carried *nft.Carried
	err := f.flows.Reinstall(ctx, func(c *nftables.Conn) (*nft.Ruleset, error) {
		carried = carriedFrom(f.table.Snapshot())
		if f.place != nil {
			// The pins were the kernel's alone and went with the table:
			// their flows are placed by hash again, on the same BE while
			// its slots stay.
			return f.installPlace(c, carried)
		}
		inst, err := nft.InstallFE(c, f.tableParams(), carried.Init(), []nft.QueueMode{f.qmode})
		if err != nil {
			return nil, err
		}
		return inst.Ruleset, nil
	})
	if err != nil {
		return err
	}
	f.reinstalls.Add(time.Now(), found)
	f.m.TableReinstalls.WithLabelValues("ip").Inc()
	f.log.Info("handed-off connections forwarded again", "op", "nft",
		"forwarded", len(carried.Forward), "closing", len(carried.Closing))
	return nil
}

// carriedFrom is what a reinstall puts back into the FE's table from the
// connection table: every HANDOFFED and TIME_WAIT connection's forwarding
// to its BE, with the closing mark of those in TIME_WAIT (their FIN or RST
// was seen). Connections still HANDOFFING are left out: their switch is an
// edit of its own, made after the reinstall. The fresh marks of new
// connections on reused ports are not in the table and are lost: such a
// connection's packets follow the previous connection's forwarding until
// its own handoff replaces it.
func carriedFrom(rows []conntab.Conn) *nft.Carried {
	c := &nft.Carried{Found: true, Forward: map[netip.AddrPort]netip.Addr{}, Closing: map[netip.AddrPort]bool{},
		Fresh: map[netip.AddrPort]bool{}}
	for _, r := range rows {
		if !r.BE.IsValid() || (r.State != conntab.Handoffed && r.State != conntab.TimeWait) {
			continue
		}
		c.Forward[r.Client] = r.BE
		if r.State == conntab.TimeWait {
			c.Closing[r.Client] = true
		}
	}
	return c
}
