package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
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
	// A reload waits for the agent's verdict (tcphactl exits 1 on a refused
	// file, TestReload), so `systemctl reload` fails when the config is
	// refused; SIGHUP told nobody. The stop covers the default drain (20 s)
	// and the reset and cleanup after it (agent.StopTime); a longer drain
	// extends it from the agent. The hardening is what TCP_REPAIR, nft,
	// NFQUEUE, sock_diag and gratuitous ARP leave possible.
	for _, want := range []string{"ExecStart=/opt/tcpha/sbin/tcpha-agent -c /etc/tcpha/tcpha.conf",
		"ExecReload=/opt/tcpha/bin/tcphactl -c /etc/tcpha/tcpha.conf reload", "Type=notify", "WatchdogSec=30s",
		"Restart=on-failure", "TimeoutStopSec=40\n",
		"RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX AF_PACKET\n",
		"SystemCallFilter=@system-service bpf\n", "SystemCallArchitectures=native\n",
		"ProtectSystem=strict\n", "PrivateTmp=yes\n", "ProtectKernelTunables=yes\n",
		"ProtectKernelModules=yes\n", "ProtectControlGroups=yes\n", "RestrictNamespaces=yes\n",
		"MemoryDenyWriteExecute=yes\n", "NoNewPrivileges=yes\n", "ReadWritePaths=/run/tcpha /var/log\n"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("the unit lacks %q:\n%s", want, unit)
		}
	}
	if strings.Contains(string(unit), "ExecReload=/bin/kill") {
		t.Errorf("the unit reloads by a signal nobody answers:\n%s", unit)
	}
	// systemd-analyze (Debian's systemd package) checks the directives and
	// the commands. It wants the commands where the unit names them, so
	// it reads a copy whose paths point into DESTDIR.
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatal("systemd-analyze is needed (Debian: systemd):", err)
	}
	vdir := t.TempDir()
	vunit := filepath.Join(vdir, "tcpha-agent.service")
	if err := os.WriteFile(vunit, []byte(strings.ReplaceAll(string(unit), "/opt/tcpha/", dest+"/opt/tcpha/")), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", "--man=no", vunit).CombinedOutput(); err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	// The exposure systemd-analyze reports: 7.1 before the hardening, 2.9
	// with it. It must not creep back.
	out, err := exec.Command("systemd-analyze", "security", "--offline=yes", "--threshold=30", vunit).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security: exposure above 3.0: %v\n%s", err, out)
	}
	if strings.Contains(string(unit), "/usr/local") {
		t.Errorf("the unit still names /usr/local:\n%s", unit)
	}
	st, err := os.Stat(filepath.Join(dest, "etc/tcpha/tcpha.conf"))
	if err != nil || st.Mode().Perm() != 0o640 {
		t.Errorf("the config: %v %v, want mode 0640", st.Mode(), err)
	} else if sys, ok := st.Sys().(*syscall.Stat_t); !ok || sys.Uid != 0 || sys.Gid != 0 {
		t.Errorf("the config's owner: %+v, want root:root (no tcpha group exists)", st.Sys())
	}
	// The README says where each goes (issue 18: it said the unit went
	// under PREFIX, and the Makefile's comment named a tcpha group).
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"binaries and man pages under PREFIX (/usr/local), the unit in",
		"SYSTEMD (/etc/systemd/system; its paths follow PREFIX)", "config (0640 root:root"} {
		if !strings.Contains(string(readme), want) {
			t.Errorf("README.md does not say %q of make install", want)
		}
	}
	makefile, _ := os.ReadFile("../Makefile")
	if strings.Contains(string(makefile), "tcpha group") {
		t.Error("the Makefile still names a tcpha group that make install never creates")
	}
	out, err = exec.Command(filepath.Join(dest, "opt/tcpha/sbin/tcpha-agent"), "-version").CombinedOutput()
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
