package config

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// manKeys returns, per section, the keys tcpha.conf(5) documents: the
// words of each .TP entry's heading line under .SH [section].
func manKeys(man string) map[string][]string {
	word := regexp.MustCompile(`^[a-z]+$`)
	assign := regexp.MustCompile(`"([a-z]+) = "`)
	out := map[string][]string{}
	section := ""
	lines := strings.Split(man, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, ".SH ") {
			section = ""
			if s, ok := strings.CutPrefix(l, ".SH ["); ok {
				section = strings.TrimSuffix(s, "]")
			}
			continue
		}
		if section == "" || l != ".TP" || i+1 == len(lines) {
			continue
		}
		head := lines[i+1]
		switch {
		case strings.HasPrefix(head, ".BI "):
			for _, m := range assign.FindAllStringSubmatch(head, -1) {
				out[section] = append(out[section], m[1])
			}
		case strings.HasPrefix(head, ".B "), strings.HasPrefix(head, ".BR "):
			// .BR raddr ", " vaddr ", " port: the unquoted words.
			_, rest, _ := strings.Cut(head, " ")
			for j, part := range strings.Split(rest, `"`) {
				if j%2 == 1 {
					continue // a quoted separator
				}
				for _, w := range strings.Fields(part) {
					if word.MatchString(w) {
						out[section] = append(out[section], w)
					}
				}
			}
		}
	}
	return out
}

// tcpha.conf(5) lists every key config/ accepts, in its section, and
// nothing else (issue 18: it missed [fe] redirectaddr and redirectport
// and [be] startservers, maxspareservers and minspareservers). The two
// lists cannot drift apart again.
func TestManPageListsEveryKey(t *testing.T) {
	b, err := os.ReadFile("../man/tcpha.conf.5")
	if err != nil {
		t.Fatal(err)
	}
	documented := manKeys(string(b))
	for section, keys := range allowed {
		for key := range keys {
			if !slices.Contains(documented[section], key) {
				t.Errorf("tcpha.conf(5) does not document [%s] %s, which config accepts", section, key)
			}
		}
		for _, key := range documented[section] {
			if _, ok := keys[key]; !ok {
				t.Errorf("tcpha.conf(5) documents [%s] %s, which config refuses", section, key)
			}
		}
	}
	for section := range documented {
		if _, ok := allowed[section]; !ok {
			t.Errorf("tcpha.conf(5) has a section [%s] config does not know", section)
		}
	}
	if len(documented["fe"]) < 20 {
		t.Errorf("the man page's [fe] keys were not found: %v", documented["fe"])
	}
}

// What tcpha.conf(5) says of maxheader's caps and the log levels is what
// the code does (issue 18: the BE's 16 KiB cap was missing, and the page
// said per-connection lines were at 6 while 5 and 6 are the same).
func TestManPageLimits(t *testing.T) {
	b, err := os.ReadFile("../man/tcpha.conf.5")
	if err != nil {
		t.Fatal(err)
	}
	man := strings.Join(strings.Fields(string(b)), " ")
	for _, want := range []string{"8192, from 256 to 1 MiB", "8192, from 256 to 16 KiB", "5 and 6 (the same) debug lines"} {
		if !strings.Contains(man, want) {
			t.Errorf("tcpha.conf(5) does not say %q", want)
		}
	}
	if strings.Contains(man, "lines are at 6") {
		t.Error("tcpha.conf(5) still says per-connection lines are at 6")
	}
	const secret = "[global]\nsecret = test-secret-16byte\n"
	fe := secret + "[fe]\nvaddr = 10.0.0.100\nrule = local .*\nmaxheader = "
	be := secret + "[be]\nraddr = 10.0.0.11\nuaddr = 10.0.0.250\nvaddr = 10.0.0.100\nfeaddr = 10.0.0.2\nmaxheader = "
	for _, tc := range []struct {
		text string
		ok   bool
	}{
		{fe + "1048576\n", true}, {fe + "1048577\n", false}, {fe + "255\n", false},
		{be + "16384\n", true}, {be + "16385\n", false}, {be + "255\n", false},
	} {
		if _, err := Parse("t.conf", []byte(tc.text)); (err == nil) != tc.ok {
			t.Errorf("%q: err = %v, want ok = %v", tc.text[strings.LastIndex(tc.text, "["):], err, tc.ok)
		}
	}
}
