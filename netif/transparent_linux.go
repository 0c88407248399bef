package netif

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Transparent dials (`[be] deliver = socket`, issue 15): the BE dials its
// web server over loopback from the client's own address and port, so that
// the server accepts, logs and filters the client (FACTS.md, "Handing a
// rebuilt connection to the web server's own socket"). The dialing socket
// has IP_TRANSPARENT (to bind an address that is not the host's) and
// SO_MARK TransparentMark. The server's answers to the dial go to the
// client's address; they must come back to the dialing socket through
// loopback instead of leaving the host:
//   - net.ipv4.tcp_fwmark_accept = 1: the server's end takes the SYN's mark
//     (its SYN-ACK and later segments carry it);
//   - `ip rule fwmark TransparentMark lookup TransparentTable`, before main;
//   - `local 0.0.0.0/0 dev lo` in TransparentTable: every destination is
//     local for marked packets.
//
// The transplant clears the mark of the server's socket before it becomes
// the client's connection, whose segments then route normally.
const (
	TransparentMark  = 0x7463 // "tc"
	TransparentTable = 7463
	// transparentPref places the rule before the main table's (32766).
	transparentPref = 7463
)

const fwmarkAccept = "/proc/sys/net/ipv4/tcp_fwmark_accept"

// Transparent is the routing set up for transparent dials in this
// namespace. Remove takes out what Setup added; Keep leaves it for a
// successor.
type Transparent struct {
	rule        *netlink.Rule
	route       *netlink.Route
	oldSysctl   string
	setSysctl   bool
	removedOnce bool
}

// SetupTransparent sets net.ipv4.tcp_fwmark_accept, the fwmark rule and
// the local route (each left as found if already there: a predecessor's).
func SetupTransparent() (*Transparent, error) {
	t := &Transparent{}
	ok := false
	defer func() {
		if !ok {
			t.Remove()
		}
	}()
	old, err := os.ReadFile(fwmarkAccept)
	if err != nil {
		return nil, fmt.Errorf("transparent dials: read %s: %w", fwmarkAccept, err)
	}
	if t.oldSysctl = strings.TrimSpace(string(old)); t.oldSysctl != "1" {
		if err := os.WriteFile(fwmarkAccept, []byte("1"), 0o644); err != nil {
			return nil, fmt.Errorf("transparent dials: set net.ipv4.tcp_fwmark_accept = 1: %w", err)
		}
		t.setSysctl = true
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("transparent dials: find loopback: %w", err)
	}
	t.route = &netlink.Route{
		LinkIndex: lo.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)},
		Table: TransparentTable, Type: unix.RTN_LOCAL, Scope: unix.RT_SCOPE_HOST, Protocol: unix.RTPROT_STATIC,
	}
	if err := netlink.RouteAdd(t.route); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("transparent dials: add `local 0.0.0.0/0 dev lo table %d`: %w", TransparentTable, err)
	}
	t.rule = netlink.NewRule()
	t.rule.Family = unix.AF_INET
	t.rule.Mark = TransparentMark
	t.rule.Table = TransparentTable
	t.rule.Priority = transparentPref
	if err := netlink.RuleAdd(t.rule); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("transparent dials: add `ip rule fwmark %#x lookup %d`: %w", TransparentMark, TransparentTable, err)
	}
	ok = true
	return t, nil
}

// Keep leaves the routing for the next agent (an upgrade).
func (t *Transparent) Keep() {
	if t != nil {
		t.removedOnce = true
	}
}

// Remove takes out the rule and the route (ours by their mark and table,
// whichever agent added them: after an upgrade the successor removes its
// predecessor's) and restores the sysctl if this agent changed it; it is
// idempotent.
func (t *Transparent) Remove() error {
	if t == nil || t.removedOnce {
		return nil
	}
	t.removedOnce = true
	var errs []error
	if t.rule != nil {
		if err := netlink.RuleDel(t.rule); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete the transparent dials' rule: %w", err))
		}
	}
	if t.route != nil {
		if err := netlink.RouteDel(t.route); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete the transparent dials' route: %w", err))
		}
	}
	if t.setSysctl {
		if err := os.WriteFile(fwmarkAccept, []byte(t.oldSysctl), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore net.ipv4.tcp_fwmark_accept: %w", err))
		}
	}
	return errors.Join(errs...)
}
