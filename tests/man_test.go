package tests

import (
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
)

// manSection returns the text of section name (".SH NAME") of a man page.
func manSection(t *testing.T, page, name string) string {
	t.Helper()
	b, err := os.ReadFile(page)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "\n.SH "+name+"\n")
	if i < 0 {
		t.Fatalf("%s has no %s section", page, name)
	}
	s = s[i+1:]
	if j := strings.Index(s[1:], "\n.SH "); j >= 0 {
		s = s[:j+1]
	}
	return s
}

// Each man page's OPTIONS section documents every flag its binary takes,
// as the binary's -h lists them (issue 18: tcphactl(8) had no OPTIONS
// section and no -version).
func TestManPageOptions(t *testing.T) {
	flagLine := regexp.MustCompile(`(?m)^  -([a-z]+)`)
	for bin, page := range map[string]string{ctlBin: "../man/tcphactl.8", agentBin: "../man/tcpha-agent.8"} {
		out, _ := exec.Command(bin, "-h").CombinedOutput() // -h exits 0 or 2 by the flag package's whim
		flags := flagLine.FindAllStringSubmatch(string(out), -1)
		if len(flags) < 3 {
			t.Fatalf("%s -h lists no flags:\n%s", bin, out)
		}
		opts := manSection(t, page, "OPTIONS")
		for _, f := range flags {
			if !regexp.MustCompile(`(?m)^\.B[IR]? \\-` + f[1] + `\b`).MatchString(opts) {
				t.Errorf("%s OPTIONS does not document -%s:\n%s", page, f[1], opts)
			}
		}
		if syn := manSection(t, page, "SYNOPSIS"); !strings.Contains(syn, `\-version`) {
			t.Errorf("%s SYNOPSIS has no -version:\n%s", page, syn)
		}
	}
}
