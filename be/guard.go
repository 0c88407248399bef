package be

import (
	"context"
	"time"

	"tcpha/nft"
)

// guardEvery is the backstop check of the BE's ARP table; nftables
// notifications wake the guard at once (nft.Guard).
const guardEvery = 5 * time.Second

// guard keeps the BE's ARP filter installed (issue 17: after `nft flush
// ruleset` the BE answered ARP for the VIP, and the client sent the
// cluster's traffic to it). The guard's goroutine owns the table's
// connection while it runs: nothing else uses it between Start and Stop.
func (b *BE) guard() *nft.Guard {
	return &nft.Guard{
		Table: b.owned.Rules.Table, Want: nft.ShapeOf(b.owned.Rules),
		Reinstall: b.reinstall, Every: guardEvery, Log: b.log,
	}
}

// reinstall applies a fresh ARP table: one applied before carries the
// kernel's handles.
func (b *BE) reinstall(_ context.Context, found string) error {
	if err := nft.Apply(b.owned.Conn, nft.BE(nft.BEParams{VIP: b.cfg.VAddr, UAddr: b.cfg.UAddr})); err != nil {
		return err
	}
	b.reinstalls.Add(time.Now(), found)
	b.m.TableReinstalls.WithLabelValues("arp").Inc()
	return nil
}
