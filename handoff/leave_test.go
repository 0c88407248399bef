package handoff

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"tcpha/handoff/conntab"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
)

// The FE's side of a multi-handoff: only the BE a connection is forwarded
// to may move it; the forwarding switches in one replace, or stays.
func TestMove(t *testing.T) {
	from := be1.Addr()
	cases := []struct {
		name    string
		at      netip.Addr // the BE the FE forwards the connection to
		answers map[netip.AddrPort]error
		fail    map[string]error
		want    netip.AddrPort
		wantErr error
		wantLog []string
		wantBE  netip.Addr // where the table says it is afterwards
	}{
		{name: "moved", at: from, want: be2,
			wantLog: []string{"offer 10.0.0.12:666", "forward 10.0.0.12 replace=true", "commit"}, wantBE: be2.Addr()},
		{name: "asked by a BE that does not hold it", at: be2.Addr(), wantErr: conntab.ErrNotForwarded,
			wantLog: nil, wantBE: be2.Addr()},
		{name: "refused: stays forwarded to its BE", at: from,
			answers: map[netip.AddrPort]error{be2: &RefusedError{BE: be2, Ack: wire.Ack{Result: wire.ResultUpstream}}},
			wantErr: ErrNoBE, wantLog: []string{"offer 10.0.0.12:666"}, wantBE: from},
		{name: "switch fails: the new BE aborts, stays forwarded", at: from,
			fail: map[string]error{"forward": errors.New("ENOBUFS")}, wantErr: errors.New("ENOBUFS"),
			wantLog: []string{"offer 10.0.0.12:666", "forward 10.0.0.12 replace=true", "abort"}, wantBE: from},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &calls{}
			tab := conntab.New()
			s := &Sender{Flows: fakeFlows{c, tc.fail}, Peer: fakePeer{c, tc.answers}, Table: tab,
				Log: quiet(), Timeout: time.Second, Now: time.Now}
			if err := tab.Begin(client, time.Now()); err != nil {
				t.Fatal(err)
			}
			if _, err := tab.Handed(client, tc.at, time.Now()); err != nil {
				t.Fatal(err)
			}
			got, err := s.Move(context.Background(), &wire.ConnInfo{Client: client}, from, []netip.AddrPort{be2})
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("err = %v", err)
			case tc.wantErr != nil && (err == nil || !errors.Is(err, tc.wantErr) && !strings.Contains(err.Error(), tc.wantErr.Error())):
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if got != tc.want {
				t.Errorf("BE = %v, want %v", got, tc.want)
			}
			if !reflect.DeepEqual(c.log, tc.wantLog) {
				t.Errorf("calls:\n got %q\nwant %q", c.log, tc.wantLog)
			}
			row, _ := tab.Get(client)
			if row.State != conntab.Handoffed || row.BE != tc.wantBE || tab.Live(tc.wantBE) != 1 {
				t.Errorf("table: %v at %v (live %d), want HANDOFFED at %v", row.State, row.BE, tab.Live(tc.wantBE), tc.wantBE)
			}
		})
	}
}

// A FIN that reaches the FE while the connection moves is not lost: the
// moved connection enters TIME_WAIT.
func TestMoveWithFIN(t *testing.T) {
	c := &calls{}
	tab := conntab.New()
	tab.Begin(client, time.Now())
	tab.Handed(client, be1.Addr(), time.Now())
	peer := finPeer{fakePeer{c, nil}, tab}
	s := &Sender{Flows: fakeFlows{c, nil}, Peer: peer, Table: tab, Log: quiet(), Timeout: time.Second, Now: time.Now}
	if _, err := s.Move(context.Background(), &wire.ConnInfo{Client: client}, be1.Addr(), []netip.AddrPort{be2}); err != nil {
		t.Fatal(err)
	}
	if row, _ := tab.Get(client); row.State != conntab.TimeWait || row.BE != be2.Addr() {
		t.Errorf("after a FIN during the move: %v at %v, want TIME_WAIT at be2", row.State, row.BE)
	}
}

// finPeer sees the client's FIN arrive while its offer is answered.
type finPeer struct {
	fakePeer
	tab *conntab.Table
}

func (p finPeer) Offer(ctx context.Context, be netip.AddrPort, ci *wire.ConnInfo) (Offer, error) {
	if _, act, err := p.tab.Observe(client, conntab.EvFIN, time.Now(), time.Now().Add(time.Minute)); err != nil || act != conntab.ActDrop {
		return nil, errors.New("FIN while moving: not dropped")
	}
	return p.fakePeer.Offer(ctx, be, ci)
}

// The BE's side: the socket closes silently only on the FE's OK; on any
// other answer it is resumed, and the error says whether the request stays
// (ErrStay) or the connection's fate is unknown (ErrCut).
func TestLeave(t *testing.T) {
	cases := []struct {
		name    string
		ack     wire.Ack
		askErr  error
		sendq   []byte
		wantErr error
		wantLog []string
	}{
		{name: "moved", wantLog: []string{"block", `dump "GET /b"`, "ask", "close-silently"}},
		{name: "stay", ack: wire.Ack{Result: wire.ResultStay}, wantErr: ErrStay,
			wantLog: []string{"block", `dump "GET /b"`, "ask", "resume"}},
		{name: "refused", ack: wire.Ack{Result: wire.ResultUpstream, Reason: "no BE took it"}, wantErr: errors.New("no BE took it"),
			wantLog: []string{"block", `dump "GET /b"`, "ask", "resume"}},
		{name: "never sent", askErr: ctl.ErrNotSent, wantErr: ctl.ErrNotSent,
			wantLog: []string{"block", `dump "GET /b"`, "ask", "resume"}},
		{name: "no answer: cut", askErr: context.DeadlineExceeded, wantErr: ErrCut,
			wantLog: []string{"block", `dump "GET /b"`, "ask", "resume"}},
		{name: "unacknowledged bytes: not asked", sendq: []byte("x"), wantErr: errors.New("not acknowledged"),
			wantLog: []string{"block", `dump "GET /b"`, "resume"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &calls{}
			leaving := &Leaving{}
			l := &Leaver{Timeout: time.Second, Log: quiet(), Leaving: leaving,
				Ask: func(ctx context.Context, f wire.Frame) (wire.Ack, error) {
					c.add("ask")
					var ci wire.ConnInfo
					if err := ci.UnmarshalBinary(f.Payload); err != nil || f.Type != wire.TypeMigrate || f.ConnMagic != ci.ConnMagic() {
						t.Errorf("migrate frame %v: %v", f.Type, err)
					}
					if leaving.Wait(client, 0) {
						t.Error("the connection is not marked leaving while the FE moves it")
					}
					return tc.ack, tc.askErr
				}}
			err := l.Leave(context.Background(), sendqSocket{fakeSocket{calls: c}, tc.sendq}, []byte("GET /b"))
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("err = %v", err)
			case tc.wantErr != nil && (err == nil || !errors.Is(err, tc.wantErr) && !strings.Contains(err.Error(), tc.wantErr.Error())):
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if !reflect.DeepEqual(c.log, tc.wantLog) {
				t.Errorf("calls:\n got %q\nwant %q", c.log, tc.wantLog)
			}
			if !leaving.Wait(client, 0) {
				t.Error("still marked leaving")
			}
		})
	}
}

// sendqSocket dumps a connection of client with sendq unacknowledged.
type sendqSocket struct {
	fakeSocket
	sendq []byte
}

func (s sendqSocket) Dump(consumed []byte) (*wire.ConnInfo, error) {
	ci, err := s.fakeSocket.Dump(consumed)
	if err != nil {
		return nil, err
	}
	ci.Client = client
	ci.VIP = netip.MustParseAddrPort("10.0.0.100:80")
	ci.MSS = 1460
	ci.SendQueue = s.sendq
	return ci, nil
}

// A connection coming back waits until its old socket is gone.
func TestLeavingWait(t *testing.T) {
	l := &Leaving{}
	done := l.add(client)
	if l.Wait(client, 10*time.Millisecond) {
		t.Fatal("Wait returned true while leaving")
	}
	go func() { time.Sleep(20 * time.Millisecond); done() }()
	if !l.Wait(client, time.Second) {
		t.Fatal("Wait timed out after the leave ended")
	}
	var none *Leaving
	if !none.Wait(client, 0) {
		t.Fatal("a nil Leaving waits")
	}
}

// The new BE goes down between its ack and the commit: the forwarding goes
// back to the old BE, which still holds the socket and is told to serve.
func TestMoveCommitLost(t *testing.T) {
	c := &calls{}
	tab := conntab.New()
	tab.Begin(client, time.Now())
	tab.Handed(client, be1.Addr(), time.Now())
	s := &Sender{Flows: fakeFlows{c, nil}, Peer: lostCommitPeer{fakePeer{c, nil}}, Table: tab,
		Log: quiet(), Timeout: time.Second, Now: time.Now}
	_, err := s.Move(context.Background(), &wire.ConnInfo{Client: client}, be1.Addr(), []netip.AddrPort{be2})
	if !errors.Is(err, errCommitLost) {
		t.Fatalf("err = %v, want the lost commit", err)
	}
	want := []string{"offer 10.0.0.12:666", "forward 10.0.0.12 replace=true", "commit", "forward 10.0.0.11 replace=true"}
	if !reflect.DeepEqual(c.log, want) {
		t.Errorf("calls:\n got %q\nwant %q", c.log, want)
	}
	if row, _ := tab.Get(client); row.State != conntab.Handoffed || row.BE != be1.Addr() || tab.Live(be2.Addr()) != 0 {
		t.Errorf("table: %v at %v, want HANDOFFED at be1 again", row.State, row.BE)
	}
}

type lostCommitPeer struct{ fakePeer }

func (p lostCommitPeer) Offer(ctx context.Context, be netip.AddrPort, ci *wire.ConnInfo) (Offer, error) {
	o, err := p.fakePeer.Offer(ctx, be, ci)
	if err != nil {
		return nil, err
	}
	return lostCommit{o.(fakeOffer)}, nil
}

type lostCommit struct{ fakeOffer }

func (o lostCommit) Commit() error { o.fakeOffer.Commit(); return errors.New("control session closed") }

// Which FE answers decides, and whether any FE may have acted without
// answering decides between resuming the connection (ErrNotSent) and
// resetting it.
func TestAskFEs(t *testing.T) {
	type call = func(context.Context, wire.Frame) (wire.Frame, error)
	frame := func(res wire.Result) call {
		return func(context.Context, wire.Frame) (wire.Frame, error) { return ctl.AckFrame(res, ""), nil }
	}
	fail := func(err error) call {
		return func(context.Context, wire.Frame) (wire.Frame, error) { return wire.Frame{}, err }
	}
	notSent := fmt.Errorf("%w: closed", ctl.ErrNotSent)
	lost := errors.New("control session closed")
	fe1, fe2 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")
	for _, tc := range []struct {
		name    string
		calls   []call
		want    wire.Result
		unsent  bool // the error wraps ErrNotSent
		wantErr bool
	}{
		{name: "no FE", unsent: true, wantErr: true},
		{name: "the first knows it", calls: []call{frame(wire.ResultOK), frame(wire.ResultUnknown)}, want: wire.ResultOK},
		{name: "the second knows it", calls: []call{frame(wire.ResultUnknown), frame(wire.ResultStay)}, want: wire.ResultStay},
		{name: "nobody knows it", calls: []call{frame(wire.ResultUnknown), frame(wire.ResultUnknown)}, want: wire.ResultUnknown},
		{name: "never sent anywhere", calls: []call{fail(notSent), frame(wire.ResultUnknown)}, unsent: true, wantErr: true},
		{name: "sent, then the session died", calls: []call{frame(wire.ResultUnknown), fail(lost)}, wantErr: true},
		{name: "a failure, then an answer", calls: []call{fail(lost), frame(wire.ResultOK)}, want: wire.ResultOK},
		{name: "not an ack", calls: []call{
			func(context.Context, wire.Frame) (wire.Frame, error) {
				return wire.Frame{Type: wire.TypeProbeReply}, nil
			}}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var fes []FE
			for i, c := range tc.calls {
				fes = append(fes, FE{Addr: []netip.Addr{fe1, fe2}[i], Call: c})
			}
			ack, err := AskFEs(context.Background(), fes, wire.Frame{Type: wire.TypeMigrate})
			switch {
			case tc.wantErr && err == nil:
				t.Fatalf("answer %v, want an error", ack.Result)
			case !tc.wantErr && err != nil:
				t.Fatalf("err = %v", err)
			case errors.Is(err, ctl.ErrNotSent) != tc.unsent:
				t.Errorf("err = %v: wraps ErrNotSent %v, want %v", err, errors.Is(err, ctl.ErrNotSent), tc.unsent)
			case err == nil && ack.Result != tc.want:
				t.Errorf("answer %v, want %v", ack.Result, tc.want)
			}
		})
	}
}

// An FE that died without closing its sessions (its host or link failed)
// does not answer until the BE's answer bound runs out: asked first, it
// used to take the whole bound, and the connection was cut although the
// other FE, which had taken the VIP over, knew it (issue 17).
func TestAskFEsDeadFE(t *testing.T) {
	dead := func(ctx context.Context, _ wire.Frame) (wire.Frame, error) {
		<-ctx.Done()
		return wire.Frame{}, ctx.Err()
	}
	live := func(context.Context, wire.Frame) (wire.Frame, error) { return ctl.AckFrame(wire.ResultOK, ""), nil }
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	start := time.Now()
	ack, err := AskFEs(ctx, []FE{{Addr: netip.MustParseAddr("10.0.0.2"), Call: dead}, {Addr: netip.MustParseAddr("10.0.0.3"), Call: live}},
		wire.Frame{Type: wire.TypeMigrate})
	if err != nil || ack.Result != wire.ResultOK || time.Since(start) > time.Second {
		t.Errorf("with a dead FE asked first: %v %v after %v, want the live FE's OK at once", ack.Result, err, time.Since(start))
	}
}

// A switch caught by a failover (issue 17): the active FE died with the
// request (its call never returns), and the standby answers unknown flow
// until it holds the VIP. AskFEs gives up (the outcome is unknown, the
// connection is cut); AskFEsAgain asks the standby again until it answers.
// With no FE left unanswered it does not wait: unknown flow at once.
func TestAskFEsAgain(t *testing.T) {
	dead := func(ctx context.Context, _ wire.Frame) (wire.Frame, error) {
		<-ctx.Done()
		return wire.Frame{}, ctx.Err()
	}
	standby := func() func(context.Context, wire.Frame) (wire.Frame, error) {
		var n atomic.Int32
		return func(context.Context, wire.Frame) (wire.Frame, error) {
			if n.Add(1) <= 3 {
				return ctl.AckFrame(wire.ResultUnknown, "standby FE"), nil
			}
			return ctl.AckFrame(wire.ResultOK, ""), nil
		}
	}
	fe1, fe2 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")
	ask := func(again bool) (wire.Ack, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		defer cancel()
		fes := []FE{{Addr: fe1, Call: dead}, {Addr: fe2, Call: standby()}}
		if again {
			return AskFEsAgain(ctx, fes, wire.Frame{Type: wire.TypeSwitch}, 10*time.Millisecond)
		}
		return AskFEs(ctx, fes, wire.Frame{Type: wire.TypeSwitch})
	}
	if ack, err := ask(false); err == nil {
		t.Errorf("AskFEs with the active FE dead: %v, want an unknown outcome", ack.Result)
	}
	start := time.Now()
	if ack, err := ask(true); err != nil || ack.Result != wire.ResultOK || time.Since(start) > 400*time.Millisecond {
		t.Errorf("AskFEsAgain: %v %v after %v, want the standby's OK once it takes over", ack.Result, err, time.Since(start))
	}
	start = time.Now()
	unknown := func(context.Context, wire.Frame) (wire.Frame, error) {
		return ctl.AckFrame(wire.ResultUnknown, ""), nil
	}
	ack, err := AskFEsAgain(context.Background(), []FE{{Addr: fe1, Call: unknown}, {Addr: fe2, Call: unknown}},
		wire.Frame{Type: wire.TypeSwitch}, 10*time.Millisecond)
	if err != nil || ack.Result != wire.ResultUnknown || time.Since(start) > 100*time.Millisecond {
		t.Errorf("AskFEsAgain, every FE answered unknown: %v %v after %v, want unknown at once", ack.Result, err, time.Since(start))
	}
}
