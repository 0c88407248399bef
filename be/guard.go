package be

import (
	"context"
	"fmt"
	"log/slog"
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
		Settled: func() {
			// A VIP whose restore failed comes back once the filter is
			// seen in place.
			if b.vip.Withdrawn() {
				if err := b.vip.Restore(); err != nil {
					b.log.Error("VIP not put back on lo", "op", "nft", "err", err)
					return
				}
				b.log.Info("VIP back on lo", "op", "nft")
			}
		},
	}
}

// reinstall applies a fresh ARP table: one applied before carries the
// kernel's handles.
func (b *BE) reinstall(_ context.Context, found string) error {
	err := rearm(b.vip, func() error {
		return nft.Apply(b.owned.Conn, nft.BE(nft.BEParams{VIP: b.cfg.VAddr, UAddr: b.cfg.UAddr}))
	}, b.log)
	if err != nil {
		return err
	}
	b.reinstalls.Add(time.Now(), found)
	b.m.TableReinstalls.WithLabelValues("arp").Inc()
	return nil
}

// withdrawer is the VIP on loopback (netif.VIP).
type withdrawer interface {
	Withdraw() (bool, error)
	Restore() error
}

// rearm puts the ARP filter back with apply, with the VIP off loopback
// meanwhile: a BE that holds the VIP without its filter answers ARP for
// it, and the client sends the cluster's traffic here (issue 17). When
// apply fails the VIP stays off until a later check installs the filter.
// Taking it off leaves its sockets alone (docs/design.md, "A BE without
// its ARP filter"). A VIP that cannot be withdrawn does not stop the
// filter from coming back.
func rearm(vip withdrawer, apply func() error, log *slog.Logger) error {
	if now, err := vip.Withdraw(); err != nil {
		log.Error("VIP not withdrawn while the ARP filter is missing", "op", "nft", "err", err)
	} else if now {
		log.Warn("VIP withdrawn from lo until the ARP filter is back", "op", "nft")
	}
	if err := apply(); err != nil {
		return fmt.Errorf("reinstall the ARP filter (the VIP stays off lo): %w", err)
	}
	if err := vip.Restore(); err != nil {
		return fmt.Errorf("ARP filter back: %w", err)
	}
	log.Info("ARP filter back; VIP back on lo", "op", "nft")
	return nil
}
