// Package privtest gates tests that need root. Outside CI a test without
// root is skipped with a reason; in CI (CI=true, which runs as root) a
// missing privilege fails the test instead, so nothing is skipped silently.
package privtest

import (
	"os"
	"testing"
)

// Require skips t without root, or fails it when running in CI.
func Require(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("this test needs root, and CI must run it: run the suite as root")
	}
	t.Skip("needs root (CAP_NET_ADMIN); run `make test` as root")
}
