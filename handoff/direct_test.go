package handoff

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"testing"
	"time"

	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
)

// directPeer is fakePeer whose commits may fail.
type directPeer struct {
	fakePeer
	commitErr error
}

func (p directPeer) Offer(ctx context.Context, be netip.AddrPort, ci *wire.ConnInfo) (Offer, error) {
	o, err := p.fakePeer.Offer(ctx, be, ci)
	if err != nil {
		return nil, err
	}
	return directOffer{o.(fakeOffer), p.commitErr}, nil
}

type directOffer struct {
	fakeOffer
	commitErr error
}

func (o directOffer) Commit() error { o.add("commit"); return o.commitErr }

// A BE-to-BE move, message by message: every outcome leaves one BE
// answering the client, or the client reset (ErrCut); never two, never a
// silent hang. The socket is closed only after the commit went out, so a
// resumed connection can always be reset.
func TestDirectMove(t *testing.T) {
	refused := &RefusedError{BE: be2, Ack: wire.Ack{Result: wire.ResultUpstream}}
	cases := []struct {
		name      string
		answers   map[netip.AddrPort]error
		switchErr error
		commitErr error
		want      netip.AddrPort
		wantErr   error // nil: moved
		cut       bool  // the caller must reset
		wantLog   []string
	}{
		{name: "moved", want: be2,
			wantLog: []string{"block", `dump "GET /x"`, "offer 10.0.0.12:666", "switch 10.0.0.12", "commit", "close-silently"}},
		{name: "the first BE refuses: the next takes it", answers: map[netip.AddrPort]error{be1: refused}, want: be2,
			wantLog: []string{"block", `dump "GET /x"`, "offer 10.0.0.11:666", "offer 10.0.0.12:666", "switch 10.0.0.12", "commit", "close-silently"}},
		{name: "no BE takes it: served here", answers: map[netip.AddrPort]error{be1: refused, be2: refused}, wantErr: ErrNoBE,
			wantLog: []string{"block", `dump "GET /x"`, "offer 10.0.0.11:666", "offer 10.0.0.12:666", "resume"}},
		{name: "the FE refuses the switch: aborted, served here", switchErr: fmt.Errorf("%w: not your flow", ErrRefused), wantErr: ErrRefused,
			wantLog: []string{"block", `dump "GET /x"`, "offer 10.0.0.11:666", "switch 10.0.0.11", "abort", "resume"}},
		{name: "no FE saw the switch: aborted, served here", switchErr: fmt.Errorf("%w: no session", ctl.ErrNotSent), wantErr: ctl.ErrNotSent,
			wantLog: []string{"block", `dump "GET /x"`, "offer 10.0.0.11:666", "switch 10.0.0.11", "abort", "resume"}},
		{name: "the FE's answer is lost: aborted, reset", switchErr: context.DeadlineExceeded, wantErr: ErrCut, cut: true,
			wantLog: []string{"block", `dump "GET /x"`, "offer 10.0.0.11:666", "switch 10.0.0.11", "abort", "resume"}},
		{name: "the commit is lost: reset, the socket not closed", commitErr: errors.New("session closed"), wantErr: ErrCut, cut: true,
			wantLog: []string{"block", `dump "GET /x"`, "offer 10.0.0.11:666", "switch 10.0.0.11", "commit", "resume"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := &calls{}
			d := &Direct{Peer: directPeer{fakePeer{c, tc.answers}, tc.commitErr},
				Switch: func(_ context.Context, flow netip.AddrPort, to netip.Addr) error {
					c.add("switch %v", to)
					return tc.switchErr
				},
				Timeout: time.Second, SwitchTimeout: time.Second, Log: quiet(), Leaving: &Leaving{}}
			bes := []netip.AddrPort{be1, be2}
			if tc.name == "moved" {
				bes = []netip.AddrPort{be2}
			}
			got, err := d.Leave(context.Background(), fakeSocket{calls: c}, []byte("GET /x"), bes)
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("err = %v", err)
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr):
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if errors.Is(err, ErrCut) != tc.cut {
				t.Errorf("cut = %v, want %v (%v)", !tc.cut, tc.cut, err)
			}
			if got != tc.want {
				t.Errorf("BE = %v, want %v", got, tc.want)
			}
			if !reflect.DeepEqual(c.log, tc.wantLog) {
				t.Errorf("calls:\n got %q\nwant %q", c.log, tc.wantLog)
			}
		})
	}
}

// A connection with bytes its client has not acknowledged never moves: it
// is resumed before any offer.
func TestDirectMoveUnacked(t *testing.T) {
	c := &calls{}
	d := &Direct{Peer: fakePeer{c, nil}, Switch: func(context.Context, netip.AddrPort, netip.Addr) error { return nil },
		Timeout: time.Second, SwitchTimeout: time.Second, Log: quiet()}
	sock := unackedSocket{fakeSocket{calls: c}}
	if _, err := d.Leave(context.Background(), sock, nil, []netip.AddrPort{be2}); err == nil || errors.Is(err, ErrCut) {
		t.Fatalf("err = %v, want a plain refusal", err)
	}
	if want := []string{"block", `dump ""`, "resume"}; !reflect.DeepEqual(c.log, want) {
		t.Errorf("calls %q, want %q", c.log, want)
	}
}

type unackedSocket struct{ fakeSocket }

func (s unackedSocket) Dump(consumed []byte) (*wire.ConnInfo, error) {
	ci, err := s.fakeSocket.Dump(consumed)
	if ci != nil {
		ci.SendQueue = []byte("unacked")
	}
	return ci, err
}
