package nft

import (
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"tcpha/backends"
	"tcpha/internal/privtest"
)

func TestFEPlaceListed(t *testing.T) {
	ns, fd := privtest.NetNS(t)
	if err := Apply(conn(t, fd), FEPlace(sampleFE, samplePlace)); err != nil {
		t.Fatal(err)
	}
	golden(t, "fe-place.nft", listRuleset(t, ns))
}

// placeNet is an FE namespace with the VIP on lo and a veth to a client
// namespace. The BEs' addresses are on the link but nobody answers for
// them: the FE's copies die unanswered in ARP, which is enough to see where
// the packet path placed each flow.
type placeNet struct {
	fe, client string
	fd         int
	vip        netip.Addr
}

func newPlaceNet(t *testing.T) placeNet {
	fe, fd := privtest.NetNS(t)
	client, _ := privtest.NetNS(t)
	n := placeNet{fe: fe, client: client, fd: fd, vip: netip.MustParseAddr("10.9.0.100")}
	for _, c := range [][]string{
		{"ip", "-n", fe, "link", "add", "fe0", "type", "veth", "peer", "name", "cl0", "netns", client},
		{"ip", "-n", fe, "addr", "add", "10.9.0.1/24", "dev", "fe0"},
		{"ip", "-n", fe, "addr", "add", n.vip.String() + "/32", "dev", "lo"},
		{"ip", "-n", fe, "link", "set", "lo", "up"},
		{"ip", "-n", fe, "link", "set", "fe0", "up"},
		{"ip", "-n", client, "addr", "add", "10.9.0.2/24", "dev", "cl0"},
		{"ip", "-n", client, "link", "set", "cl0", "up"},
		{"ip", "-n", client, "route", "add", n.vip.String() + "/32", "via", "10.9.0.1"},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
	return n
}

// syns opens a socket per port in the client namespace and starts a
// connect to the VIP: one SYN each (and retransmissions until closed).
func (n placeNet) syns(t *testing.T, ports []uint16) (closeAll func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	target, err := netns.GetFromName(n.client)
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		t.Fatal(err)
	}
	defer netns.Set(orig)
	var fds []int
	closeAll = func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
		fds = nil
	}
	for _, p := range ports {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			closeAll()
			t.Fatal(err)
		}
		fds = append(fds, fd)
		if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{10, 9, 0, 2}, Port: int(p)}); err != nil {
			closeAll()
			t.Fatalf("bind port %d: %v", p, err)
		}
		if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: n.vip.As4(), Port: 80}); err != unix.EINPROGRESS {
			closeAll()
			t.Fatalf("connect from port %d: %v", p, err)
		}
	}
	return closeAll
}

// tcpOut reads the FE stack's TCP InSegs and OutSegs (/proc/net/snmp).
func (n placeNet) tcpSegs(t *testing.T) (in, out int) {
	lines := strings.Split(privtest.In(t, n.fe, "cat", "/proc/net/snmp"), "\n")
	for i := 0; i+1 < len(lines); i++ {
		if strings.HasPrefix(lines[i], "Tcp:") && strings.HasPrefix(lines[i+1], "Tcp:") {
			names, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
			for j := range names {
				switch names[j] {
				case "InSegs":
					fmt.Sscan(vals[j], &in)
				case "OutSegs":
					fmt.Sscan(vals[j], &out)
				}
			}
			return in, out
		}
	}
	t.Fatal("no Tcp line in /proc/net/snmp")
	return
}

func placeFE(n placeNet, size uint32) FEParams {
	return FEParams{VIP: n.vip, Port: 80, FreshTimeout: time.Minute, TimeWait: 10 * time.Second,
		IdleTimeout: 15 * time.Minute, Size: size, QueueNum: 3, Queue: QueueCompat}
}

func ports(from, n int) []uint16 {
	out := make([]uint16, n)
	for i := range out {
		out[i] = uint16(from + i)
	}
	return out
}

// Real SYNs through the placement table: each flow is pinned to the BE of
// its slot (the kernel's jhash, which SlotOf reproduces), the BEs share
// the flows by weight, the FE's stack never sees a segment, and a pin
// whose flow never sends a request is gone after PinTimeout.
func TestFEPlaceSYNs(t *testing.T) {
	if _, err := os.Stat("/proc/net/snmp"); err != nil {
		t.Skip(err)
	}
	n := newPlaceNet(t)
	be1, be2 := netip.MustParseAddr("10.9.0.11"), netip.MustParseAddr("10.9.0.12")
	slots := backends.Slots([]backends.SlotBE{{Addr: be1, Weight: 3}, {Addr: be2, Weight: 1}})
	pl := Placement{BEs: []netip.Addr{be1, be2}, Slots: slots, Modulus: backends.SlotCount, Seed: 0x5eed,
		PinTimeout: 2 * time.Second}
	rs := FEPlace(placeFE(n, 65536), pl)
	if err := Apply(conn(t, n.fd), rs); err != nil {
		t.Fatal(err)
	}
	const flows = 400
	closeAll := n.syns(t, ports(20000, flows))
	defer closeAll()
	time.Sleep(300 * time.Millisecond)

	pinned, err := NewReader(conn(t, n.fd), rs).Members(MapForward)
	if err != nil {
		t.Fatal(err)
	}
	if len(pinned) != flows {
		t.Fatalf("%d flows pinned, want %d", len(pinned), flows)
	}
	per := map[netip.Addr]int{}
	for flow, be := range pinned {
		per[be]++
		if want := slots[SlotOf(flow, pl.Modulus, pl.Seed)]; be != want {
			t.Errorf("flow %v pinned to %v; its slot %d is %v's", flow, be, SlotOf(flow, pl.Modulus, pl.Seed), want)
		}
	}
	if share := float64(per[be1]) / flows; math.Abs(share-0.75) > 0.08 {
		t.Errorf("%v holds %.2f of the flows, want 0.75 (3:1)", be1, share)
	}
	t.Logf("flows per BE: %v", per)
	if in, out := n.tcpSegs(t); in != 0 || out != 0 {
		t.Errorf("the FE's stack received %d and sent %d TCP segments; want none", in, out)
	}
	// No more SYNs: the pins of flows that never sent a request lapse.
	closeAll()
	time.Sleep(pl.PinTimeout + 1500*time.Millisecond)
	if left, err := NewReader(conn(t, n.fd), rs).Members(MapForward); err != nil || len(left) != 0 {
		t.Errorf("%d pins left %v after PinTimeout (%v)", len(left), pl.PinTimeout, err)
	}
}

// A SYN flood fills @forward; SYNs beyond its size are still forwarded to
// their BE by hash, counted by the place_ chains' second rule, and the FE's
// stack still sees nothing.
func TestFEPlaceFullMap(t *testing.T) {
	n := newPlaceNet(t)
	be1 := netip.MustParseAddr("10.9.0.11")
	pl := Placement{BEs: []netip.Addr{be1}, Slots: backends.Slots([]backends.SlotBE{{Addr: be1, Weight: 1}}),
		Modulus: backends.SlotCount, Seed: 0x5eed, PinTimeout: time.Minute}
	const size, flows = 16, 40
	rs := FEPlace(placeFE(n, size), pl)
	if err := Apply(conn(t, n.fd), rs); err != nil {
		t.Fatal(err)
	}
	closeAll := n.syns(t, ports(30000, flows))
	defer closeAll()
	time.Sleep(300 * time.Millisecond)
	pinned, err := NewReader(conn(t, n.fd), rs).Members(MapForward)
	if err != nil {
		t.Fatal(err)
	}
	if len(pinned) != size {
		t.Errorf("%d flows pinned, want the map's size %d", len(pinned), size)
	}
	chain := privtest.In(t, n.fe, "nft", "list", "chain", "ip", "tcpha", PlaceChain(be1))
	var copiedPinned, unpinned int
	for _, l := range strings.Split(chain, "\n") {
		var p int
		if i := strings.Index(l, "counter packets "); i >= 0 {
			fmt.Sscan(l[i+len("counter packets "):], &p)
		}
		switch {
		case strings.Contains(l, `"SYN: forward, pin"`):
			copiedPinned = p
		case strings.Contains(l, `"SYN forwarded above, @forward full: not pinned"`):
			unpinned = p
		}
	}
	// The first SYN of every flow, pinned or not, went through the place_
	// chain and was copied there once.
	if copiedPinned != size || unpinned != flows-size {
		t.Errorf("place_ chain: %d SYNs pinned, %d forwarded unpinned; want %d and %d\n%s",
			copiedPinned, unpinned, size, flows-size, chain)
	}
	if in, out := n.tcpSegs(t); in != 0 || out != 0 {
		t.Errorf("the FE's stack received %d and sent %d TCP segments; want none", in, out)
	}
}

// The agent fills an empty placing table by edits: a BE without chains
// gets them with its first slots, and new SYNs follow the slot map.
func TestEditPlacement(t *testing.T) {
	n := newPlaceNet(t)
	be1, be2 := netip.MustParseAddr("10.9.0.11"), netip.MustParseAddr("10.9.0.12")
	pl := Placement{BEs: []netip.Addr{be1}, Modulus: backends.SlotCount, Seed: 0x5eed, PinTimeout: time.Minute}
	p := placeFE(n, 65536)
	rs := FEPlace(p, pl)
	c := conn(t, n.fd)
	if err := Apply(c, rs); err != nil {
		t.Fatal(err)
	}
	// No slot has a BE: SYNs go to the FE's stack (its frontend answers
	// 503), nothing is pinned.
	closeAll := n.syns(t, ports(21000, 50))
	time.Sleep(200 * time.Millisecond)
	closeAll()
	if got, err := NewReader(c, rs).Members(MapForward); err != nil || len(got) != 0 {
		t.Fatalf("%d flows pinned with no slots (%v)", len(got), err)
	}
	slots := backends.Slots([]backends.SlotBE{{Addr: be1, Weight: 1}, {Addr: be2, Weight: 1}})
	var edits []SlotEdit
	for _, ch := range slots.Diff(make(backends.SlotTable, backends.SlotCount)) {
		edits = append(edits, SlotEdit{Slot: uint32(ch.Slot), From: ch.From, To: ch.To})
	}
	if err := EditPlacement(c, rs, p, pl, []netip.Addr{be2}, edits); err != nil {
		t.Fatal(err)
	}
	if d := ShapeOf(rs).Diff(inspect(t, c, rs)); d != "" {
		t.Errorf("the table differs from the ruleset after the edit: %s", d)
	}
	closeAll = n.syns(t, ports(22000, 200))
	defer closeAll()
	time.Sleep(300 * time.Millisecond)
	pinned, err := NewReader(c, rs).Members(MapForward)
	if err != nil || len(pinned) != 200 {
		t.Fatalf("%d flows pinned, want 200 (%v)", len(pinned), err)
	}
	for flow, be := range pinned {
		if want := slots[SlotOf(flow, pl.Modulus, pl.Seed)]; be != want {
			t.Errorf("flow %v pinned to %v, its slot's BE is %v", flow, be, want)
		}
	}
}

func inspect(t *testing.T, c *nftables.Conn, rs *Ruleset) Shape {
	t.Helper()
	s, err := Inspect(c, rs.Table)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// An upgrade reads its predecessor's slot map back: the successor places
// new flows as before from its first SYN.
func TestReadSlots(t *testing.T) {
	_, fd := privtest.NetNS(t)
	c := conn(t, fd)
	if got, err := ReadSlots(c, FEPlace(sampleFE, samplePlace).Table); err != nil || len(got) != 0 {
		t.Fatalf("no table: %v %v", got, err)
	}
	rs := FEPlace(sampleFE, samplePlace)
	if err := Apply(c, rs); err != nil {
		t.Fatal(err)
	}
	got, err := ReadSlots(c, rs.Table)
	if err != nil {
		t.Fatal(err)
	}
	for i, be := range samplePlace.Slots {
		if got[uint32(i)] != be {
			t.Errorf("slot %d: %v, want %v", i, got[uint32(i)], be)
		}
	}
	if len(got) != len(samplePlace.Slots) {
		t.Errorf("%d slots read, want %d", len(got), len(samplePlace.Slots))
	}
}
