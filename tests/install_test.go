package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// `make install` puts the binaries, the unit, the man pages and the sample
// config where PREFIX and DESTDIR say, the unit's paths follow PREFIX, and
// the config, which holds the secret, is not world-readable.
func TestMakeInstall(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatal("make is needed:", err)
	}
	dest := t.TempDir()
	cmd := exec.Command("make", "-C", "..", "install", "DESTDIR="+dest, "PREFIX=/opt/tcpha", "BIN="+t.TempDir())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	for _, f := range []string{"opt/tcpha/sbin/tcpha-agent", "opt/tcpha/bin/tcphactl",
		"opt/tcpha/share/man/man8/tcpha-agent.8", "opt/tcpha/share/man/man8/tcphactl.8",
		"opt/tcpha/share/man/man5/tcpha.conf.5", "etc/systemd/system/tcpha-agent.service"} {
		if _, err := os.Stat(filepath.Join(dest, f)); err != nil {
			t.Error(err)
		}
	}
	unit, _ := os.ReadFile(filepath.Join(dest, "etc/systemd/system/tcpha-agent.service"))
	for _, want := range []string{"ExecStart=/opt/tcpha/sbin/tcpha-agent -c /etc/tcpha/tcpha.conf",
		"ExecReload=/bin/kill -HUP $MAINPID", "Type=notify", "WatchdogSec=", "Restart=on-failure"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("the unit lacks %q:\n%s", want, unit)
		}
	}
	if strings.Contains(string(unit), "/usr/local") {
		t.Errorf("the unit still names /usr/local:\n%s", unit)
	}
	st, err := os.Stat(filepath.Join(dest, "etc/tcpha/tcpha.conf"))
	if err != nil || st.Mode().Perm() != 0o640 {
		t.Errorf("the config: %v %v, want mode 0640", st.Mode(), err)
	}
	out, err := exec.Command(filepath.Join(dest, "opt/tcpha/sbin/tcpha-agent"), "-version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "tcpha-agent ") || strings.Contains(string(out), "devel") {
		t.Errorf("tcpha-agent -version: %v %q", err, out)
	}
	// The man pages render without warnings.
	for _, m := range []string{"man8/tcpha-agent.8", "man8/tcphactl.8", "man5/tcpha.conf.5"} {
		cmd := exec.Command("man", "--warnings", "-l", filepath.Join(dest, "opt/tcpha/share/man", m))
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil || len(out) < 500 || stderr.Len() > 0 {
			t.Errorf("man %s: %v %q %s", m, err, stderr.String(), out)
		}
	}
}
