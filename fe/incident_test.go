package fe

import (
	"context"
	"encoding/json"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"tcpha/backends"
	"tcpha/handoff/wire"
)

// kill tells the BE to reset each connection handed off to it and drops
// their forwarding and rows; other BEs' connections, and those still
// being handed off, stay.
func TestKill(t *testing.T) {
	f, flows, peers := testFE(t, time.Second)
	now := time.Now()
	c1 := netip.MustParseAddrPort("10.0.0.50:1001")
	c2 := netip.MustParseAddrPort("10.0.0.50:1002")
	c3 := netip.MustParseAddrPort("10.0.0.51:1003")
	c4 := netip.MustParseAddrPort("10.0.0.52:1004")
	for _, c := range []netip.AddrPort{c1, c2, c3, c4} {
		if err := f.table.Begin(c, now); err != nil {
			t.Fatal(err)
		}
	}
	for c, be := range map[netip.AddrPort]netip.Addr{c1: be1, c2: be1, c3: be2} {
		if _, err := f.table.Handed(c, be, now); err != nil {
			t.Fatal(err)
		}
	}
	f.table.Offering(c4, be1) // still HANDOFFING
	var text strings.Builder
	v, err := f.Command("kill", []string{be1.String()}, &text)
	if err != nil {
		t.Fatal(err)
	}
	if got := v.(map[string]any); got["reset"] != 2 || got["not_reached"] != 0 {
		t.Errorf("kill answered %v", got)
	}
	slices.SortFunc(peers.resets, func(a, b reset) int { return a.Client.Compare(b.Client) })
	want := []reset{{netip.AddrPortFrom(be1, 666), c1}, {netip.AddrPortFrom(be1, 666), c2}}
	if !slices.Equal(peers.resets, want) {
		t.Errorf("resets %v, want %v", peers.resets, want)
	}
	calls := strings.Join(flows.calls, "; ")
	if !strings.Contains(calls, "remove "+c1.String()) || !strings.Contains(calls, "remove "+c2.String()) || strings.Contains(calls, c3.String()) {
		t.Errorf("forwarding edits: %s", calls)
	}
	for c, gone := range map[netip.AddrPort]bool{c1: true, c2: true, c3: false, c4: false} {
		if f.table.Absent(c) != gone {
			t.Errorf("%v: absent %v, want %v", c, !gone, gone)
		}
	}
	if _, err := f.Command("kill", []string{"10.0.0.99"}, &text); err == nil {
		t.Error("kill of an unknown BE")
	}
	// conns filters the table.
	var rows []connRow
	f.table.Handed(c4, be1, now)
	v, err = f.Command("conns", []string{"be=" + be1.String()}, &text)
	if err != nil {
		t.Fatal(err)
	}
	rows = v.([]connRow)
	if len(rows) != 1 || rows[0].ClientPort != 1004 {
		t.Errorf("conns be=%v: %+v", be1, rows)
	}
	v, _ = f.Command("conns", []string{"client=10.0.0.51", "state=handoffed"}, &text)
	if rows = v.([]connRow); len(rows) != 1 || rows[0].BE != be2.String() {
		t.Errorf("conns client= state=: %+v", rows)
	}
	v, _ = f.Command("conns", []string{"state=time_wait"}, &text)
	if b, _ := json.Marshal(v); string(b) != "[]" {
		t.Errorf("no rows: %s", b)
	}
}

// maint forces a BE down whatever its probes say, so that its rules fall
// through, and ready lets it back; backends shows it.
func TestMaintCommand(t *testing.T) {
	f, _, _ := testFE(t, time.Second)
	var text strings.Builder
	if _, err := f.Command("maint", []string{be2.String()}, &text); err != nil {
		t.Fatal(err)
	}
	f.probe(context.Background(), netip.AddrPortFrom(be2, 666), time.Second)
	if r := f.sched.Route(req("/a.jpg")); len(r.BEs) != 1 || r.BEs[0].Addr() != be1 {
		t.Errorf("a .jpg with be2 in maint: %+v", r)
	}
	text.Reset()
	f.Command("backends", nil, &text)
	if !strings.Contains(text.String(), "NOTAVAILABLE,MAINT") {
		t.Errorf("backends:\n%s", text.String())
	}
	if _, err := f.Command("ready", []string{be2.String()}, &text); err != nil {
		t.Fatal(err)
	}
	if r := f.sched.Route(req("/a.jpg")); len(r.BEs) == 0 || r.BEs[0].Addr() != be2 {
		t.Errorf("a .jpg after ready: %+v", r)
	}
}

// rates come from the handoffs and the BEs' relay counters; rules count
// their hits; clear counters zeroes both, peaks included.
func TestRatesRulesClear(t *testing.T) {
	f, _, peers := testFE(t, time.Second)
	t0 := time.Now()
	f.sampleStats(context.Background(), t0)
	for range 3 {
		f.sched.Route(req("/a.jpg"))
		f.sched.Handed(be2)
	}
	peers.stats = wire.RelayStats{Requests: 10, BytesIn: 2000, BytesOut: 50000}
	f.sampleStats(context.Background(), t0.Add(2*time.Second))
	var text strings.Builder
	v, err := f.Command("rates", nil, &text)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(v)
	for _, want := range []string{`"addr":"10.0.0.12"`, `"rate":{"connections":1.5,"requests":5,"bytes_in":1000,"bytes_out":25000}`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("rates JSON lacks %s: %s", want, b)
		}
	}
	if !strings.Contains(text.String(), "25000") {
		t.Errorf("rates text:\n%s", text.String())
	}
	text.Reset()
	f.Command("rules", nil, &text)
	if !strings.Contains(text.String(), `\.jpg$`) || !strings.Contains(text.String(), "  3") {
		t.Errorf("rules:\n%s", text.String())
	}
	f.Command("clear", []string{"counters"}, &text)
	if rs := f.sched.Rules(); rs[0].Hits != 0 {
		t.Errorf("hits after clear: %+v", rs)
	}
	for _, r := range f.rates.Rows() {
		if r.Peak.Conns > r.Rate.Conns {
			t.Errorf("peak after clear: %+v", r)
		}
	}
}

func req(path string) backends.Request { return backends.Request{Path: path} }

// status names a BE in maint as such, not as down for its last probe.
func TestStatusMaint(t *testing.T) {
	f, _, _ := testFE(t, time.Second)
	f.sched.SetMaint(be2, true)
	for _, b := range f.statusBackends() {
		if b.Addr == be2.String() && b.State != "maint" {
			t.Errorf("be2 in maint: %+v", b)
		}
	}
}
