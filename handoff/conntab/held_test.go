package conntab

import (
	"net/netip"
	"reflect"
	"testing"
	"time"
)

// TestUnheld is the decision behind the FE's question to a BE (issue 19):
// which rows go when the BE answers with the flows it holds.
func TestUnheld(t *testing.T) {
	be2 := netip.MustParseAddr("10.0.0.12")
	c := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("10.0.0.10"), port) }
	tab := New()
	hand := func(k netip.AddrPort, be netip.Addr, at time.Time) {
		t.Helper()
		if err := tab.Begin(k, at); err != nil {
			t.Fatal(err)
		}
		tab.Offering(k, be)
		if _, err := tab.Handed(k, be, at); err != nil {
			t.Fatal(err)
		}
	}
	asked := t0.Add(10 * time.Second)
	hand(c(1), be1, t0)                     // be1 holds it: stays
	hand(c(2), be1, t0)                     // be1 lost it: goes
	hand(c(3), be1, asked)                  // handed off as the question went out: stays
	hand(c(4), be1, asked.Add(time.Second)) // handed off after it: stays
	hand(c(5), be2, t0)                     // another BE's: stays
	hand(c(6), be1, t0)                     // closing already: stays for the reaper
	tab.Observe(c(6), EvFIN, t0, t0.Add(time.Minute))
	if err := tab.Begin(c(7), t0); err != nil { // being handed off: stays
		t.Fatal(err)
	}
	tab.Offering(c(7), be1)
	tab.Adopt(c(8), be1, Handoffed, t0, time.Time{}) // a predecessor's, lost: goes

	held := map[netip.AddrPort]bool{c(1): true}
	got := tab.Unheld(be1, asked, func(k netip.AddrPort) bool { return held[k] })
	want := []ExpiredRow{{c(2), Handoffed, t0}, {c(8), Handoffed, t0}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Unheld = %v\nwant      %v", got, want)
	}
	// A BE that restarted holds nothing: every row of its older than the
	// question goes.
	if got := tab.Unheld(be1, asked, func(netip.AddrPort) bool { return false }); len(got) != 3 {
		t.Errorf("a restarted BE: %d rows go, want 3 (%v)", len(got), got)
	}

	live := tab.Live(be1)
	until := asked.Add(time.Second)
	if !tab.CloseIf(c(2), t0, asked, until) {
		t.Fatal("CloseIf of an unchanged row did nothing")
	}
	if r, _ := tab.Get(c(2)); r.State != TimeWait || !r.Until.Equal(until) || !r.Since.Equal(asked) {
		t.Errorf("after CloseIf: %+v, want TIME_WAIT until %v", r, until)
	}
	if tab.Live(be1) != live-1 {
		t.Errorf("live connections of be1: %d, want %d", tab.Live(be1), live-1)
	}
	if tab.CloseIf(c(2), t0, asked, until) {
		t.Error("CloseIf twice")
	}
	// The client reused the port after the decision: the new connection
	// is a new instance and stays.
	hand(c(8), be1, asked.Add(2*time.Second))
	if tab.CloseIf(c(8), t0, asked, until) {
		t.Error("CloseIf ended a new connection on a reused port")
	}
	// Moved to another BE after the decision: stays.
	if err := tab.BeginMove(c(1), be1, asked); err != nil {
		t.Fatal(err)
	}
	if tab.CloseIf(c(1), t0, asked, until) {
		t.Error("CloseIf ended a connection being moved")
	}
	if tab.CloseIf(c(9), t0, asked, until) {
		t.Error("CloseIf of no row")
	}
}
