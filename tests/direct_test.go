package tests

import (
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	cluster "tcpha/internal/nscluster"
	"tcpha/internal/privtest"
)

// BEs hand connections to each other directly (issue 14): a keep-alive
// connection whose next request is be2's moves from be1 to be2 over their
// own control session, and the FE only switches the flow. That session
// takes only the cluster's members, authenticated: its bytes, captured
// and replayed byte for byte from the client and from mallory, get
// nothing back; from be1's own address they fail the handshake; none
// moves a connection.
func TestDirectMoveSessions(t *testing.T) {
	privtest.Require(t)
	c, err := cluster.New(cluster.Options{Agent: agentBin, BEs: 2, Mallory: true,
		Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dumpLogs(t, c); c.Close() })
	for _, h := range []string{"be1", "be2"} {
		if err := c.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	be2 := netip.AddrPortFrom(netip.MustParseAddr(c.BEs[1].IP), 666)
	// The BE-to-BE sessions come up with the FE's cluster frame.
	rec := startCapture(t, c, "be2", "tcp port 666 and host "+c.BEs[0].IP)
	if err := c.StartAgent("fe"); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(c.Grep("be1", "control sessions up"), "peer="+be2.String()); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("be1 has no session to be2")
		}
	}
	out := curl(t, c, "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %header{x-served-by} %{num_connects}\n",
		url+"/index.html", url+"/img/a.jpg")
	if want := "200 be1 1\n200 be2 0\n"; out != want {
		t.Fatalf("one connection, be1's then be2's content: %q, want %q", out, want)
	}
	if in := statusOf(t, c, "be2", "moved_in"); in != 1 {
		t.Errorf("be2 counts %d connections moved in, want 1", in)
	}
	if moved := c.Grep("fe", "connection moved"); moved != "" {
		t.Errorf("the FE carried the move itself; the BEs should have:\n%s", moved)
	}
	if !strings.Contains(c.Grep("fe", "connection switched"), "from="+c.BEs[0].IP) {
		t.Errorf("the FE switched no flow from be1:\n%s", c.Grep("fe", "migrate"))
	}
	rec.stop(t)
	segs, err := readPcap(rec.file)
	if err != nil {
		t.Fatal(err)
	}
	replay := streamFrom(segs, netip.MustParseAddr(c.BEs[0].IP), be2)
	if len(replay) < 200 {
		t.Fatalf("captured only %d bytes of be1's session to be2", len(replay))
	}
	served := statusOf(t, c, "be2", "served")
	for _, host := range []string{"client", "mallory"} {
		if got := sendRaw(t, c, host, be2.String(), replay); len(got) != 0 {
			t.Errorf("replay from %s got %d bytes back", host, len(got))
		}
	}
	// From be1's own address the member check passes and be2 says hello;
	// the handshake does not: be2's nonce is new.
	sendRaw(t, c, "be1", be2.String(), replay)
	if got := statusOf(t, c, "be2", "served"); got != served {
		t.Errorf("be2 took %d connections from the replays", got-served)
	}
	log, _ := os.ReadFile(c.AgentLog("be2"))
	if !strings.Contains(string(log), "wrong proof") {
		t.Errorf("the replay from be1's address was not refused for its proof:\n%s", tailString(string(log), 2000))
	}
	// Moves go on.
	out = curl(t, c, "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_code} %header{x-served-by}\n",
		url+"/index.html", url+"/img/a.jpg")
	if out != "200 be1\n200 be2\n" {
		t.Errorf("after the replays: %q", out)
	}
}
