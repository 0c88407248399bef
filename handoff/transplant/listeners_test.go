package transplant

import (
	"net/netip"
	"slices"
	"testing"
)

// Lines as this machine's kernel prints them: nginx with reuseport (two
// listeners on 127.0.0.1:80), one on *:80, one on 127.0.0.1:8080, and an
// established connection to 127.0.0.1:80.
const procNetTCP = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 100 0 0 10 0
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 100 0 0 10 0
   3: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1004 1 0000000000000000 100 0 0 10 0
   4: 0100007F:0050 0100007F:C350 01 00000000:00000000 00:00000000 00000000    65534        0 1005 1 0000000000000000 20 4 30 10 -1
`

func TestParseListeners(t *testing.T) {
	got, err := ParseListeners([]byte(procNetTCP), netip.MustParseAddrPort("127.0.0.1:80"))
	if err != nil {
		t.Fatal(err)
	}
	if want := []uint64{1001, 1002, 1003}; !slices.Equal(got, want) {
		t.Errorf("listeners of 127.0.0.1:80: %v, want %v", got, want)
	}
	got, _ = ParseListeners([]byte(procNetTCP), netip.MustParseAddrPort("10.0.0.1:80"))
	if want := []uint64{1003}; !slices.Equal(got, want) {
		t.Errorf("listeners of 10.0.0.1:80: %v, want %v (the wildcard one)", got, want)
	}
	if _, err := ParseListeners([]byte("h\n 0: zz:0050 0:0 0A a b c d e 1\n"), netip.MustParseAddrPort("127.0.0.1:80")); err == nil {
		t.Error("a malformed address was accepted")
	}
}
