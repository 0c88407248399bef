package conntab

import (
	"errors"
	"net/netip"
	"reflect"
	"testing"
	"time"
)

var (
	flow = netip.MustParseAddrPort("10.0.0.10:40000")
	be1  = netip.MustParseAddr("10.0.0.11")
	t0   = time.Unix(1000, 0)
)

func TestLifecycle(t *testing.T) {
	tab := New()
	if err := tab.Begin(flow, t0); err != nil {
		t.Fatal(err)
	}
	if c, _ := tab.Get(flow); c.State != Handoffing {
		t.Fatalf("after Begin: %v", c.State)
	}
	replace, err := tab.Handed(flow, be1, t0.Add(300*time.Microsecond))
	if err != nil || replace {
		t.Fatalf("Handed: replace=%v err=%v", replace, err)
	}
	c, _ := tab.Get(flow)
	if c.State != Handoffed || c.BE != be1 || c.Latency != 300*time.Microsecond || !c.Forwarded {
		t.Fatalf("after Handed: %+v", c)
	}
	if !tab.Closing(flow, t0.Add(time.Second)) {
		t.Fatal("Closing refused")
	}
	if tab.Closing(flow, t0.Add(5*time.Second)) {
		t.Error("a second FIN moved the TIME_WAIT deadline")
	}
	if got := tab.Expired(t0.Add(10*time.Second), 10*time.Second, time.Hour, nil); len(got) != 0 {
		t.Errorf("expired before its time: %v", got)
	}
	if got := tab.Expired(t0.Add(11*time.Second), 10*time.Second, time.Hour, nil); !reflect.DeepEqual(got, []netip.AddrPort{flow}) {
		t.Errorf("expired = %v", got)
	}
	tab.Remove(flow)
	if tab.Len() != 0 {
		t.Error("not removed")
	}
}

func TestIllegalEvents(t *testing.T) {
	cases := []struct {
		name  string
		setup func(*Table)
		event func(*Table) error
	}{
		{"handed unknown", func(*Table) {}, func(tb *Table) error { _, err := tb.Handed(flow, be1, t0); return err }},
		{"failed unknown", func(*Table) {}, func(tb *Table) error { _, err := tb.Failed(flow); return err }},
		{"begin twice", func(tb *Table) { tb.Begin(flow, t0) }, func(tb *Table) error { return tb.Begin(flow, t0) }},
		{"handed twice", func(tb *Table) { tb.Begin(flow, t0); tb.Handed(flow, be1, t0) },
			func(tb *Table) error { _, err := tb.Handed(flow, be1, t0); return err }},
		{"failed after handed", func(tb *Table) { tb.Begin(flow, t0); tb.Handed(flow, be1, t0) },
			func(tb *Table) error { _, err := tb.Failed(flow); return err }},
		{"handed in time_wait", func(tb *Table) { tb.Begin(flow, t0); tb.Handed(flow, be1, t0); tb.Closing(flow, t0) },
			func(tb *Table) error { _, err := tb.Handed(flow, be1, t0); return err }},
	}
	for _, tc := range cases {
		tab := New()
		tc.setup(tab)
		if err := tc.event(tab); !errors.Is(err, ErrIllegal) {
			t.Errorf("%s: err = %v, want ErrIllegal", tc.name, err)
		}
	}
	// Closing outside HANDOFFED is ignored, not an error: FIN of a local flow.
	tab := New()
	tab.Begin(flow, t0)
	if tab.Closing(flow, t0) {
		t.Error("Closing moved a HANDOFFING flow")
	}
}

// A client that reuses its port while the old flow is still forwarded: the
// new handoff must replace the kernel's entry, and a failed one must remove it.
func TestPortReuse(t *testing.T) {
	tab := New()
	tab.Begin(flow, t0)
	tab.Handed(flow, be1, t0)
	tab.Closing(flow, t0)
	if err := tab.Begin(flow, t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	replace, err := tab.Handed(flow, netip.MustParseAddr("10.0.0.12"), t0.Add(time.Second))
	if err != nil || !replace {
		t.Errorf("replace = %v, %v", replace, err)
	}
	tab.Begin(flow, t0.Add(2*time.Second))
	stale, err := tab.Failed(flow)
	if err != nil || !stale {
		t.Errorf("stale = %v, %v", stale, err)
	}
	tab.Begin(flow, t0)
	if stale, _ := tab.Failed(flow); stale {
		t.Error("fresh flow reported stale forwarding")
	}
}

func TestIdleExpiry(t *testing.T) {
	tab := New()
	other := netip.MustParseAddrPort("10.0.0.10:40001")
	for _, f := range []netip.AddrPort{flow, other} {
		tab.Begin(f, t0)
		tab.Handed(f, be1, t0)
	}
	alive := func(f netip.AddrPort) bool { return f == other }
	if got := tab.Expired(t0.Add(time.Minute), time.Second, time.Hour, alive); len(got) != 0 {
		t.Errorf("idle before the idle timeout: %v", got)
	}
	if got := tab.Expired(t0.Add(2*time.Hour), time.Second, time.Hour, alive); !reflect.DeepEqual(got, []netip.AddrPort{flow}) {
		t.Errorf("idle = %v, want only the silent flow", got)
	}
	tab.Adopt(other, be1, t0)
	if tab.Len() != 2 {
		t.Error("Adopt replaced a live entry")
	}
	tab.Adopt(netip.MustParseAddrPort("10.0.0.10:1"), be1, t0)
	if s := tab.Snapshot(); len(s) != 3 || s[0].Client.Port() != 1 || s[0].State != Handoffed {
		t.Errorf("snapshot %+v", s)
	}
}
