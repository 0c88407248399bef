package nft

import (
	"errors"
	"fmt"

	"github.com/google/nftables"
)

// OpenLasting opens the lasting netlink connection a role's table lives
// on. Lasting, because opening a socket per transaction made each
// handoff's element update cost 8-24 ms instead of 10-60 µs (measured in
// a namespace, docs/performance.md).
func OpenLasting() (*nftables.Conn, error) {
	c, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	return c, nil
}

// Owned is a role's table in the kernel and the lasting connection it
// lives on. The zero value owns nothing.
type Owned struct {
	Conn  *nftables.Conn
	Rules *Ruleset // set once the table is in
}

// Remove removes the table and closes the connection. It is idempotent.
func (o *Owned) Remove() error {
	var errs []error
	if o.Conn != nil && o.Rules != nil {
		if err := Remove(o.Conn, o.Rules.Table); err != nil {
			errs = append(errs, err)
		}
		o.Rules = nil
	}
	o.Keep()
	return errors.Join(errs...)
}

// Keep closes the connection but leaves the table in the kernel, for the
// next agent to adopt. It is idempotent.
func (o *Owned) Keep() {
	if o.Conn != nil {
		o.Conn.CloseLasting()
		o.Conn = nil
	}
	o.Rules = nil
}
