package nft

import (
	"strings"
	"testing"

	"tcpha/internal/privtest"
)

// The BE's delivered table as nft lists it, in whichever queue mode the
// kernel takes (this one has no nft_queue: the xtables target).
func TestDeliveredRuleset(t *testing.T) {
	ns, fd := privtest.NetNS(t)
	c := conn(t, fd)
	rs, mode, err := InstallDelivered(c, sampleDelivered, QueuePreference)
	if err != nil {
		t.Fatal(err)
	}
	got := listRuleset(t, ns)
	listed := queueListed(mode, sampleDelivered.QueueNum)
	golden(t, "be-delivered.nft", strings.ReplaceAll(got, listed, queueListed(QueueCompat, sampleDelivered.QueueNum)))
	if !strings.Contains(got, "bypass") {
		t.Errorf("no queue rule with bypass:\n%s", got)
	}
	if err := Remove(c, rs.Table); err != nil {
		t.Fatal(err)
	}
}
