package nft

import (
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

func TestShapeDiff(t *testing.T) {
	want := ShapeOf(FE(FEParams{VIP: netip.MustParseAddr("10.0.0.1"), Port: 80}))
	if len(want.Chains) != 1 || want.Chains["prerouting"] != 7 || len(want.Sets) != 4 {
		t.Fatalf("FE shape %+v", want)
	}
	for _, tc := range []struct {
		name  string
		found Shape
		diff  string
	}{
		{"intact", want, ""},
		{"flushed ruleset", Shape{}, "table missing"},
		{"flushed table", Shape{Exists: true, Chains: map[string]int{"prerouting": 0}, Sets: want.Sets},
			"chain prerouting has 0 rules, want 7"},
		{"chain and set deleted", Shape{Exists: true, Chains: map[string]int{"x": 1}, Sets: []string{"alive", "closing", "fresh"}},
			"chain prerouting missing; unexpected chain x; set forward missing"},
	} {
		if got := want.Diff(tc.found); got != tc.diff {
			t.Errorf("%s: got %q, want %q", tc.name, got, tc.diff)
		}
	}
	be := ShapeOf(BE(BEParams{VIP: netip.MustParseAddr("10.0.0.1"), UAddr: netip.MustParseAddr("10.0.0.9")}))
	if be.Chains["input"] != 2 || be.Chains["output"] != 2 || len(be.Sets) != 0 {
		t.Errorf("BE shape %+v", be)
	}
}

func TestTouches(t *testing.T) {
	msg := func(fam nftables.TableFamily, table string) []byte {
		ae := netlink.NewAttributeEncoder()
		ae.String(1, table)
		ae.String(2, "prerouting")
		b, err := ae.Encode()
		if err != nil {
			t.Fatal(err)
		}
		return append([]byte{byte(fam), 0, 0, 0}, b...)
	}
	ip, arp := nftables.TableFamilyIPv4, nftables.TableFamilyARP
	for _, tc := range []struct {
		name string
		typ  uint8
		data []byte
		want bool
	}{
		{"our table deleted", unix.NFT_MSG_DELTABLE, msg(ip, "tcpha"), true},
		{"our table destroyed", nftMsgDestroyTable, msg(ip, "tcpha"), true},
		{"a rule of ours deleted", unix.NFT_MSG_DELRULE, msg(ip, "tcpha"), true},
		{"a chain of ours added", unix.NFT_MSG_NEWCHAIN, msg(ip, "tcpha"), true},
		{"our set deleted", unix.NFT_MSG_DELSET, msg(ip, "tcpha"), true},
		{"another table", unix.NFT_MSG_DELTABLE, msg(ip, "filter"), false},
		{"our name, other family", unix.NFT_MSG_DELTABLE, msg(arp, "tcpha"), false},
		{"our own element edits", unix.NFT_MSG_NEWSETELEM, msg(ip, "tcpha"), false},
		{"a new generation", unix.NFT_MSG_NEWGEN, msg(ip, "tcpha"), false},
		{"truncated", unix.NFT_MSG_DELTABLE, []byte{2, 0}, false},
	} {
		if got := touches(tc.typ, tc.data, ip, "tcpha"); got != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
}
