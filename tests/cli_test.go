package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// `tcpha-agent -t` checks a config like `nginx -t`: it needs no root and
// touches nothing.
func TestCheckConfig(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.conf")
	bad := filepath.Join(dir, "bad.conf")
	os.WriteFile(good, []byte("[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.11 .*\n"), 0o644)
	os.WriteFile(bad, []byte("[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.12 .*\n"), 0o644)

	out, err := exec.Command(agentBin, "-t", "-c", good).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "syntax is ok, roles: fe") {
		t.Errorf("good config: %v: %s", err, out)
	}
	out, err = exec.Command(agentBin, "-t", "-c", bad).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Errorf("bad config: exit %v, want 1", err)
	}
	want := bad + ":4: [fe] rule: target 10.0.0.12 is not declared by any `server =` line"
	if !strings.Contains(string(out), want) {
		t.Errorf("bad config said %q, want %q", out, want)
	}
	if out, err := exec.Command(agentBin, "-t", "-c", filepath.Join(dir, "missing.conf")).CombinedOutput(); err == nil {
		t.Errorf("missing config accepted: %s", out)
	}
	// The shipped samples pass the check too.
	samples, _ := filepath.Glob("../etc/*.conf")
	for _, s := range samples {
		if out, err := exec.Command(agentBin, "-t", "-c", s).CombinedOutput(); err != nil {
			t.Errorf("%s: %v: %s", s, err, out)
		}
	}
}

// Without a secret, -t passes but warns: the sessions are then protected by
// the member check alone.
func TestCheckConfigWarnsWithoutSecret(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "nosecret.conf")
	os.WriteFile(conf, []byte("[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\n"), 0o644)
	out, err := exec.Command(agentBin, "-t", "-c", conf).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "warning") || !strings.Contains(string(out), "no [global] secret") {
		t.Errorf("%v: %s", err, out)
	}
	withSecret := filepath.Join(dir, "secret.conf")
	os.WriteFile(withSecret, []byte("[global]\nsecret = s\n[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\n"), 0o644)
	if out, err := exec.Command(agentBin, "-t", "-c", withSecret).CombinedOutput(); err != nil || strings.Contains(string(out), "warning") {
		t.Errorf("with a secret: %v: %s", err, out)
	}
}
