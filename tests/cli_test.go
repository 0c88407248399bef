package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"tcpha/config"
)

// `tcpha-agent -t` checks a config like `nginx -t`: it needs no root and
// touches nothing.
func TestCheckConfig(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.conf")
	bad := filepath.Join(dir, "bad.conf")
	os.WriteFile(good, []byte("[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.11 .*\n"+secret), 0o644)
	os.WriteFile(bad, []byte("[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.12 .*\n"+secret), 0o644)

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
	// The shipped samples are refused for their placeholder secret, by
	// design, and pass once it is replaced.
	samples, _ := filepath.Glob("../etc/tcpha*.conf") // keepalived.conf is keepalived's
	for _, s := range samples {
		out, err := exec.Command(agentBin, "-t", "-c", s).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), s+":8: [global] secret: is the sample's placeholder") {
			t.Errorf("%s as shipped: %v: %s, want exit 1 naming the placeholder secret", s, err, out)
		}
		b, _ := os.ReadFile(s)
		own := filepath.Join(dir, filepath.Base(s))
		os.WriteFile(own, []byte(strings.ReplaceAll(string(b), config.SampleSecret, "6f1c0e5b9d2a4c7e8b3f0a1d2c4e6f80")), 0o644)
		if out, err := exec.Command(agentBin, "-t", "-c", own).CombinedOutput(); err != nil || strings.Contains(string(out), "warning") {
			t.Errorf("%s with its own secret: %v: %s", s, err, out)
		}
	}
}

// -t prints what is legal but probably not meant, and still accepts the
// config (issue 18, item 6), as nginx -t prints its [warn] lines.
func TestCheckConfigWarns(t *testing.T) {
	conf := filepath.Join(t.TempDir(), "warn.conf")
	os.WriteFile(conf, []byte("[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.11 \\.jpg$\n"+secret), 0o644)
	out, err := exec.Command(agentBin, "-t", "-c", conf).CombinedOutput()
	want := "tcpha-agent: warning: " + conf + ":4: [fe] rule: no catch-all rule"
	if err != nil || !strings.Contains(string(out), want) || !strings.Contains(string(out), "syntax is ok") {
		t.Errorf("-t: %v: %q, want exit 0, %q and syntax is ok", err, out, want)
	}
}

// secret is the [global] section a config that opens control sessions needs.
const secret = "[global]\nsecret = test-cluster-secret\n"

// A host that opens or accepts control sessions must hold the cluster's
// secret: without it a BE would obey every local user of its FEs' hosts
// (issue 19). -t refuses the config, naming the file, section and key; an
// FE that hands nothing off needs none.
func TestCheckConfigRequiresSecret(t *testing.T) {
	dir := t.TempDir()
	for name, text := range map[string]string{
		"be":           "[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\n",
		"fe-servers":   "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.11 .*\n",
		"fe-dregister": "[fe]\nraddr = 10.0.0.2\nvaddr = 10.0.0.100\ndregister = 1\nrule = local .*\n",
	} {
		conf := filepath.Join(dir, name+".conf")
		os.WriteFile(conf, []byte(text), 0o644)
		out, err := exec.Command(agentBin, "-t", "-c", conf).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), conf+": [global] secret: missing") {
			t.Errorf("%s without a secret: %v %q, want exit 1 naming %s: [global] secret", name, err, out, conf)
		}
		os.WriteFile(conf, []byte(text+secret), 0o644)
		if out, err := exec.Command(agentBin, "-t", "-c", conf).CombinedOutput(); err != nil || strings.Contains(string(out), "warning") {
			t.Errorf("%s with a secret: %v: %s", name, err, out)
		}
	}
	local := filepath.Join(dir, "local.conf")
	os.WriteFile(local, []byte("[fe]\nvaddr = 10.0.0.100\nrule = local .*\n"), 0o644)
	if out, err := exec.Command(agentBin, "-t", "-c", local).CombinedOutput(); err != nil {
		t.Errorf("an FE without servers: %v: %s", err, out)
	}
}

// -t rejects what would break the agent later, naming it; stray arguments
// are a usage error; -version answers.
func TestCheckConfigRejects(t *testing.T) {
	dir := t.TempDir()
	fe := "[fe]\nvaddr = 10.0.0.100\nserver = 10.0.0.11 666\nrule = 10.0.0.11 .*\n"
	cases := []struct{ name, text, say string }{
		{"duplicate server", fe + "server = 10.0.0.11 777\n", "10.0.0.11 is already declared on line 3"},
		{"overflowing duration", fe + "timewait = 99999999999999999999\n", "timewait"},
		{"duration past a year", fe + "drain = 40000000\n", "longer than a year"},
		{"unwritable logfile", "[global]\nsecret = test-cluster-secret\nlogfile = /proc/tcpha/agent.log\n" + fe, "[global] logfile /proc/tcpha/agent.log"},
		{"unwritable accesslog", "[global]\nsecret = test-cluster-secret\naccesslog = /proc/tcpha/access.log\n" + fe, "[global] accesslog /proc/tcpha/access.log"},
		{"registration without raddr", "[fe]\nvaddr = 10.0.0.100\ndregister = 1\nrule = local .*\n", "[fe] dregister: needs [fe] raddr"},
		{"unknown scheduler", fe + "scheduler = fastest\n", "scheduler"},
	}
	for _, tc := range cases {
		path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".conf")
		if !strings.Contains(tc.text, "[global]") {
			tc.text += secret
		}
		os.WriteFile(path, []byte(tc.text), 0o644)
		out, err := exec.Command(agentBin, "-t", "-c", path).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), tc.say) {
			t.Errorf("%s: %v %q, want exit 1 saying %q", tc.name, err, out, tc.say)
		}
	}
	// Inline comments, as operators write them, are comments.
	path := filepath.Join(dir, "comments.conf")
	os.WriteFile(path, []byte("[fe]\nvaddr = 10.0.0.100   # the VIP\nserver = 10.0.0.11 666 weight=2 ; big one\n"+
		"rule = 10.0.0.11 \\.html$ # pages\nrule = 10.0.0.11 .*\n"+secret), 0o644)
	if out, err := exec.Command(agentBin, "-t", "-c", path).CombinedOutput(); err != nil {
		t.Errorf("inline comments: %v %s", err, out)
	}
	out, err := exec.Command(agentBin, "-c", path, "extra").CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), `unexpected argument "extra"`) {
		t.Errorf("a stray argument: %v %q, want exit 2", err, out)
	}
	for _, bin := range []string{agentBin, ctlBin} {
		out, err := exec.Command(bin, "-version").CombinedOutput()
		if err != nil || !strings.HasPrefix(string(out), filepath.Base(bin)+" ") {
			t.Errorf("%s -version: %v %q", bin, err, out)
		}
	}
}
