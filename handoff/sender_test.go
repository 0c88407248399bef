package handoff

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"tcpha/handoff/conntab"
	"tcpha/handoff/wire"
)

// calls records, in order, what the sender asked of the kernel and the BEs.
type calls struct{ log []string }

func (c *calls) add(format string, a ...any) { c.log = append(c.log, fmt.Sprintf(format, a...)) }

type fakeFlows struct {
	*calls
	fail map[string]error
}

func (f fakeFlows) Forward(_ context.Context, k netip.AddrPort, be netip.Addr, replace bool) error {
	f.add("forward %v replace=%v", be, replace)
	return f.fail["forward"]
}
func (f fakeFlows) Unforward(_ context.Context, k netip.AddrPort) error {
	f.add("unforward")
	return nil
}

type fakeSocket struct {
	*calls
	dumpErr  error
	blockErr error
}

func (s fakeSocket) Block() error { s.add("block"); return s.blockErr }

func (s fakeSocket) Dump(consumed []byte) (*wire.ConnInfo, error) {
	s.add("dump %q", consumed)
	if s.dumpErr != nil {
		return nil, s.dumpErr
	}
	return &wire.ConnInfo{RecvQueue: consumed}, nil
}
func (s fakeSocket) CloseSilently() error { s.add("close-silently"); return nil }
func (s fakeSocket) Resume() error        { s.add("resume"); return nil }

type fakePeer struct {
	*calls
	answers map[netip.AddrPort]error // nil: accept
}

func (p fakePeer) Offer(_ context.Context, be netip.AddrPort, ci *wire.ConnInfo) (Offer, error) {
	p.add("offer %v", be)
	if err := p.answers[be]; err != nil {
		return nil, err
	}
	return fakeOffer{p.calls}, nil
}

type fakeOffer struct{ *calls }

func (o fakeOffer) Commit() error { o.add("commit"); return nil }
func (o fakeOffer) Abort()        { o.add("abort") }

var (
	client = netip.MustParseAddrPort("10.0.0.10:40000")
	be1    = netip.MustParseAddrPort("10.0.0.11:666")
	be2    = netip.MustParseAddrPort("10.0.0.12:666")
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// A table at its capacity refuses a new connection before anything
// changes: no block, no dump, no offer, no kernel edit; the socket is the
// FE's to answer. One row fewer, and it is handed off.
func TestMigrateTableFull(t *testing.T) {
	c := &calls{}
	s := &Sender{Capacity: 2, Flows: fakeFlows{c, nil}, Peer: fakePeer{c, nil}, Table: conntab.New(),
		Log: quiet(), Timeout: time.Second, Now: time.Now}
	for _, k := range []string{"10.0.0.20:1", "10.0.0.20:2"} {
		s.Table.Adopt(netip.MustParseAddrPort(k), be1.Addr(), conntab.Handoffed, time.Now(), time.Time{})
	}
	_, err := s.Migrate(context.Background(), fakeSocket{calls: c}, client, []byte("GET / HTTP/1.1\r\n\r\n"), []netip.AddrPort{be1})
	if !errors.Is(err, ErrTableFull) || len(c.log) != 0 || s.Table.Len() != 2 {
		t.Fatalf("at capacity: err %v, calls %q, %d rows", err, c.log, s.Table.Len())
	}
	s.Capacity = 3
	if be, err := s.Migrate(context.Background(), fakeSocket{calls: c}, client, []byte("GET / HTTP/1.1\r\n\r\n"), []netip.AddrPort{be1}); err != nil || be != be1 {
		t.Fatalf("below capacity: %v %v", be, err)
	}
}

func TestMigrate(t *testing.T) {
	refused := &RefusedError{BE: be1, Ack: wire.Ack{Result: wire.ResultBusy}}
	unreachable := errors.New("connection refused")
	cases := []struct {
		name        string
		bes         []netip.AddrPort
		answers     map[netip.AddrPort]error
		fail        map[string]error
		dumpErr     error
		blockErr    error
		want        netip.AddrPort
		wantErr     error
		wantLog     []string
		wantResults []string
	}{
		{
			name: "first BE accepts", bes: []netip.AddrPort{be1, be2},
			want: be1,
			wantLog: []string{`block`, `dump "GET / HTTP/1.1\r\n\r\n"`, `offer 10.0.0.11:666`,
				`forward 10.0.0.11 replace=false`, `close-silently`, `commit`},
			wantResults: []string{"10.0.0.11:666 ok"},
		},
		{
			name: "refused, next accepts", bes: []netip.AddrPort{be1, be2},
			answers: map[netip.AddrPort]error{be1: refused}, want: be2,
			wantLog: []string{`block`, `dump "GET / HTTP/1.1\r\n\r\n"`, `offer 10.0.0.11:666`, `offer 10.0.0.12:666`,
				`forward 10.0.0.12 replace=false`, `close-silently`, `commit`},
			wantResults: []string{"10.0.0.11:666 refused", "10.0.0.12:666 ok"},
		},
		{
			name: "all unreachable: resumed", bes: []netip.AddrPort{be1},
			answers: map[netip.AddrPort]error{be1: unreachable}, wantErr: ErrNoBE,
			wantLog:     []string{`block`, `dump "GET / HTTP/1.1\r\n\r\n"`, `offer 10.0.0.11:666`, `resume`},
			wantResults: []string{"10.0.0.11:666 failed"},
		},
		{
			name: "no candidates", bes: nil, wantErr: ErrNoBE, wantLog: nil,
		},
		{
			name: "block fails: socket untouched", bes: []netip.AddrPort{be1},
			blockErr: errors.New("ENOMEM"), wantErr: errors.New("ENOMEM"),
			wantLog: []string{`block`},
		},
		{
			name: "dump fails", bes: []netip.AddrPort{be1}, dumpErr: errors.New("not established"),
			wantErr: errors.New("not established"),
			wantLog: []string{`block`, `dump "GET / HTTP/1.1\r\n\r\n"`, `resume`},
		},
		{
			name: "forward fails: BE told to abort", bes: []netip.AddrPort{be1},
			fail: map[string]error{"forward": errors.New("EEXIST")}, wantErr: errors.New("EEXIST"),
			wantLog: []string{`block`, `dump "GET / HTTP/1.1\r\n\r\n"`, `offer 10.0.0.11:666`,
				`forward 10.0.0.11 replace=false`, `abort`, `resume`},
			wantResults: []string{"10.0.0.11:666 failed"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &calls{}
			var results []string
			s := &Sender{
				Flows: fakeFlows{c, tc.fail}, Peer: fakePeer{c, tc.answers}, Table: conntab.New(),
				Log: quiet(), Timeout: time.Second, Now: time.Now,
				Result: func(be netip.AddrPort, err error) {
					r := "ok"
					switch {
					case IsRefusal(err):
						r = "refused"
					case err != nil:
						r = "failed"
					}
					results = append(results, be.String()+" "+r)
				},
			}
			got, err := s.Migrate(context.Background(), fakeSocket{c, tc.dumpErr, tc.blockErr}, client, []byte("GET / HTTP/1.1\r\n\r\n"), tc.bes)
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("err = %v", err)
			case tc.wantErr != nil && (err == nil || !strings.Contains(err.Error(), tc.wantErr.Error())):
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if got != tc.want {
				t.Errorf("BE = %v, want %v", got, tc.want)
			}
			if !reflect.DeepEqual(c.log, tc.wantLog) {
				t.Errorf("calls:\n got %q\nwant %q", c.log, tc.wantLog)
			}
			if !reflect.DeepEqual(results, tc.wantResults) {
				t.Errorf("results %q, want %q", results, tc.wantResults)
			}
			conn, ok := s.Table.Get(client)
			if tc.wantErr == nil && (!ok || conn.State != conntab.Handoffed || conn.BE != tc.want.Addr()) {
				t.Errorf("table entry %+v %v, want HANDOFFED to %v", conn, ok, tc.want)
			}
			if tc.wantErr != nil && ok {
				t.Errorf("failed handoff left entry %+v", conn)
			}
		})
	}
}

// A client that reuses its port: the new handoff replaces the old forward
// entry; a failed one removes it.
func TestMigratePortReuse(t *testing.T) {
	c := &calls{}
	tab := conntab.New()
	s := &Sender{Flows: fakeFlows{c, nil}, Peer: fakePeer{c, map[netip.AddrPort]error{be2: errors.New("down")}},
		Table: tab, Log: quiet(), Timeout: time.Second, Now: time.Now}
	sock := fakeSocket{calls: c}
	if _, err := s.Migrate(context.Background(), sock, client, nil, []netip.AddrPort{be1}); err != nil {
		t.Fatal(err)
	}
	c.log = nil
	if _, err := s.Migrate(context.Background(), sock, client, nil, []netip.AddrPort{be1}); err != nil {
		t.Fatal(err)
	}
	if c.log[3] != "forward 10.0.0.11 replace=true" {
		t.Errorf("reuse: %q", c.log)
	}
	c.log = nil
	if _, err := s.Migrate(context.Background(), sock, client, nil, []netip.AddrPort{be2}); !errors.Is(err, ErrNoBE) {
		t.Fatal(err)
	}
	want := []string{`block`, `dump ""`, `offer 10.0.0.12:666`, `unforward`, `resume`}
	if !reflect.DeepEqual(c.log, want) {
		t.Errorf("failed reuse:\n got %q\nwant %q", c.log, want)
	}
}

// A port reused for a request the FE serves itself: the earlier
// connection's forwarding goes; an unknown flow is left alone.
func TestKeepClearsStaleForwarding(t *testing.T) {
	c := &calls{}
	tab := conntab.New()
	s := &Sender{Flows: fakeFlows{c, nil}, Peer: fakePeer{c, nil}, Table: tab, Log: quiet(), Timeout: time.Second, Now: time.Now}
	s.Keep(context.Background(), client)
	if len(c.log) != 0 {
		t.Errorf("unknown flow: %q", c.log)
	}
	if _, err := s.Migrate(context.Background(), fakeSocket{calls: c}, client, nil, []netip.AddrPort{be1}); err != nil {
		t.Fatal(err)
	}
	tab.Observe(client, conntab.EvFIN, time.Now(), time.Now().Add(time.Minute))
	c.log = nil
	s.Keep(context.Background(), client)
	if !reflect.DeepEqual(c.log, []string{"unforward"}) {
		t.Errorf("calls %q, want the stale forwarding removed", c.log)
	}
	if _, ok := tab.Get(client); ok {
		t.Error("stale entry kept in the table")
	}
}
