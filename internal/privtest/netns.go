package privtest

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
)

var nsSeq atomic.Int64

// NetNS creates a fresh network namespace with a name unique to this process
// (parallel runs do not collide) and removes it when t ends. It returns the
// name and an open handle for libraries that take a namespace fd.
func NetNS(t testing.TB) (name string, fd int) {
	t.Helper()
	Require(t)
	name = fmt.Sprintf("tcphat-%d-%d", os.Getpid(), nsSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	f, err := os.Open("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.Close()
		exec.Command("ip", "netns", "del", name).Run()
	})
	return name, int(f.Fd())
}

// In runs a command inside namespace ns and returns its combined output,
// failing t on error.
func In(t testing.TB, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("in %s: %s: %v\n%s", ns, strings.Join(args, " "), err, out)
	}
	return string(out)
}
