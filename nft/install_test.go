package nft

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nltest"
	"golang.org/x/sys/unix"
)

// Expression names as the rule messages carry them: an NFTA_EXPR_NAME
// attribute (length 10, type 1, "queue\0") for the native queue, and the
// compat target's NFTA_TARGET_NAME "NFQUEUE".
var (
	nativeQueueAttr = []byte{10, 0, unix.NFTA_EXPR_NAME, 0, 'q', 'u', 'e', 'u', 'e', 0}
	compatQueueName = []byte("NFQUEUE\x00")
)

// fakeKernel answers batches as a kernel with or without nft_queue and
// nft_compat would: a rule with an expression it lacks fails the whole
// transaction with ENOENT when the batch is committed.
type fakeKernel struct {
	native, compat bool
	batches        []string // what each batch queued to NFQUEUE with: "native", "compat" or ""
	committed      []string // the same, for the batches the kernel took
	elements       int      // set elements in the batch taken last
}

func (k *fakeKernel) conn(t *testing.T) *nftables.Conn {
	c, err := nftables.New(nftables.WithTestDial(func(req []netlink.Message) ([]netlink.Message, error) {
		if len(req) == 0 {
			return nil, nil // a receive with nothing sent
		}
		var via string
		var refuse *netlink.Message
		elements := 0
		for i, m := range req {
			typ := uint16(m.Header.Type)
			if typ == unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSETELEM {
				elements++
			}
			if typ != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWRULE {
				continue
			}
			switch {
			case bytes.Contains(m.Data, nativeQueueAttr):
				via = "native"
				if !k.native && refuse == nil {
					refuse = &req[i]
				}
			case bytes.Contains(m.Data, compatQueueName):
				via = "compat"
				if !k.compat && refuse == nil {
					refuse = &req[i]
				}
			}
		}
		k.batches = append(k.batches, via)
		if refuse != nil {
			return nltest.Error(int(unix.ENOENT), []netlink.Message{*refuse})
		}
		k.committed = append(k.committed, via)
		k.elements = elements
		return nil, nil
	}))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// The agent tries the native queue expression and falls back to the
// xtables target when the kernel refuses it (this project's kernel), and
// keeps the native one where the kernel takes it (distro kernels).
func TestInstallFEQueueFallback(t *testing.T) {
	carried := map[string][]nftables.SetElement{MapForward: {{Key: Key(netip.MustParseAddrPort("10.0.0.10:1000")),
		Val: netip.MustParseAddr("10.0.0.11").AsSlice()}}}
	for _, tc := range []struct {
		name           string
		native, compat bool
		want           QueueMode
		batches        string // what was tried, in order
		refused        bool
	}{
		{"native refused", false, true, QueueCompat, "native compat", true},
		{"native accepted", true, true, QueueNative, "native", false},
		{"native only", true, false, QueueNative, "native", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := &fakeKernel{native: tc.native, compat: tc.compat}
			got, err := InstallFE(k.conn(t), sampleFE, carried, QueuePreference)
			if err != nil {
				t.Fatal(err)
			}
			if got.Queue != tc.want {
				t.Errorf("installed with the %v, want the %v", got.Queue, tc.want)
			}
			if s := strings.Join(k.batches, " "); s != tc.batches {
				t.Errorf("batches sent: %q, want %q", s, tc.batches)
			}
			if len(k.committed) != 1 || k.committed[0] != map[QueueMode]string{QueueNative: "native", QueueCompat: "compat"}[tc.want] {
				t.Errorf("committed %q: the rule in the kernel is not the mode reported", k.committed)
			}
			if (got.Refused != nil) != tc.refused || tc.refused && !errors.Is(got.Refused, unix.ENOENT) {
				t.Errorf("refused: %v", got.Refused)
			}
			if got.Ruleset == nil || len(got.Ruleset.Init[MapForward]) != 1 || k.elements != 1 {
				t.Errorf("the carried flows were not installed with the table: %d elements sent", k.elements)
			}
		})
	}
	// A kernel that takes neither: both refusals are reported.
	k := &fakeKernel{}
	_, err := InstallFE(k.conn(t), sampleFE, nil, QueuePreference)
	if err == nil || !strings.Contains(err.Error(), QueueNative.String()) || !strings.Contains(err.Error(), QueueCompat.String()) {
		t.Errorf("neither mode taken: %v", err)
	}
}
