package be

import (
	"errors"
	"io"
	"log/slog"
	"slices"
	"testing"
)

// fakeVIP records the calls rearm makes, in order, with the apply's.
type fakeVIP struct {
	calls       *[]string
	withdrawErr error
}

func (f fakeVIP) Withdraw() (bool, error) {
	*f.calls = append(*f.calls, "withdraw")
	return f.withdrawErr == nil, f.withdrawErr
}
func (f fakeVIP) Restore() error { *f.calls = append(*f.calls, "restore"); return nil }

// The VIP is off loopback while the ARP filter is missing, and comes back
// only once the filter is in (issue 17: a BE without its filter answered
// ARP for the VIP). A VIP that cannot be withdrawn still gets its filter
// back.
func TestRearm(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tc := range []struct {
		name        string
		applyErr    error
		withdrawErr error
		want        []string
		wantErr     bool
	}{
		{name: "filter back", want: []string{"withdraw", "apply", "restore"}},
		{name: "filter not back", applyErr: errors.New("EPERM"), want: []string{"withdraw", "apply"}, wantErr: true},
		{name: "VIP not withdrawn", withdrawErr: errors.New("EPERM"), want: []string{"withdraw", "apply", "restore"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls []string
			err := rearm(fakeVIP{calls: &calls, withdrawErr: tc.withdrawErr}, func() error {
				calls = append(calls, "apply")
				return tc.applyErr
			}, log)
			if (err != nil) != tc.wantErr {
				t.Errorf("rearm: %v, want error %v", err, tc.wantErr)
			}
			if !slices.Equal(calls, tc.want) {
				t.Errorf("calls %v, want %v", calls, tc.want)
			}
		})
	}
}
