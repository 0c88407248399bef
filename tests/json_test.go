package tests

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"tcpha/admin"
	cluster "tcpha/internal/nscluster"
)

var (
	snakeKey = regexp.MustCompile(`^[a-z][a-z0-9]*(_[a-z0-9]+)*$`)
	// goDuration is a duration as Go prints one ("1.5s", "2m0s"): tcphactl
	// gives seconds as numbers instead.
	goDuration = regexp.MustCompile(`^-?[0-9.]+(ns|µs|us|ms|s|m|h)([0-9.]+(ns|µs|us|ms|s|m|h))*$`)
)

// jsonRules checks v, the decoded output of `tcphactl -o json`, against
// tcphactl(8)'s rules: snake_case keys, durations as numbers of seconds
// (keys *_seconds), addresses without their ports (a port is a number of
// its own), and no null anywhere: an empty list is []. It returns what
// breaks them, by path.
func jsonRules(path string, v any) []string {
	var bad []string
	switch v := v.(type) {
	case nil:
		bad = append(bad, path+": null")
	case map[string]any:
		for k, e := range v {
			if !snakeKey.MatchString(k) {
				bad = append(bad, path+": key "+k+" is not snake_case")
			}
			if _, num := e.(float64); strings.HasSuffix(k, "_seconds") && !num {
				bad = append(bad, path+"."+k+": not a number of seconds")
			}
			bad = append(bad, jsonRules(path+"."+k, e)...)
		}
	case []any:
		for _, e := range v {
			bad = append(bad, jsonRules(path+"[]", e)...)
		}
	case string:
		if goDuration.MatchString(v) {
			bad = append(bad, path+": duration "+v+" as a string")
		}
		if _, err := netip.ParseAddrPort(v); err == nil {
			bad = append(bad, path+": address "+v+" with its port")
		}
	}
	return bad
}

// The rules themselves, on what tcphactl wrote before they held.
func TestJSONRules(t *testing.T) {
	for in, want := range map[string]int{
		`{"pid":1,"fe":{"vip":"10.0.0.1","port":80,"backends":[]}}`: 0,
		`{"Accepted":1,"HandoffLatencySum":1200}`:                   2,
		`{"backends":null}`: 1,
		`[{"client":"10.0.0.10:4000","age":"3s","handoff":"1.2ms"}]`: 3,
		`{"dtcinterval":"1s"}`:                                                       1,
		`{"queued_by":{"event=rst":3}}`:                                              1,
		`{"avg_handoff_seconds":"0.001"}`:                                            1,
		`{"error":"drain: 10.77.0.99 is not a BE"}`:                                  0,
		`{"addr":"10.77.0.11","port":666,"upstream":"127.0.0.1","upstream_port":80}`: 0,
	} {
		var v any
		if err := json.Unmarshal([]byte(in), &v); err != nil {
			t.Fatal(err)
		}
		if got := jsonRules("", v); len(got) != want {
			t.Errorf("%s: %q, want %d breaks", in, got, want)
		}
	}
}

// Every tcphactl command's JSON, on an FE and on a BE, answers and
// refusals alike, keeps the rules; an error is JSON with the exit code
// text mode gives.
func TestCtlJSON(t *testing.T) {
	c := newCluster(t, cluster.Options{Agent: agentBin, BEs: 1, Rules: []string{"rule = be1 .*"}})
	be1 := c.BEs[0].IP
	run := func(host string, argv ...string) (any, int) {
		t.Helper()
		cmd := exec.Command(ctlBin, append([]string{"-s", c.AdminSocket(host), "-o", "json"}, argv...)...)
		out, err := cmd.Output()
		code := 0
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			code = exit.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		var v any
		if err := json.Unmarshal(out, &v); err != nil {
			t.Errorf("tcphactl -o json %s on %s: not JSON (exit %d): %v: %q", strings.Join(argv, " "), host, code, err, out)
			return nil, code
		}
		for _, b := range jsonRules(host+" "+strings.Join(argv, " "), v) {
			t.Error(b)
		}
		if m, isErr := v.(map[string]any); isErr && m["error"] != nil && code == 0 {
			t.Errorf("tcphactl %s on %s: an error with exit 0: %v", strings.Join(argv, " "), host, v)
		}
		return v, code
	}
	// Empty tables are [] (the FE's was null).
	for _, host := range []string{"fe", "be1"} {
		run(host, "conns")
	}
	// A connection on each side's table, so that conns has rows.
	k := dialKeepAlive(t, c)
	defer k.conn.Close()
	if _, err := k.get("/index.html"); err != nil {
		t.Fatal(err)
	}
	args := map[string][]string{"loglevel": {"5"}, "dtcinterval": {"1"}, "drain": {be1}, "enable": {be1},
		"weight": {be1, "1"}, "maint": {be1}, "ready": {be1}, "kill": {be1}, "clear": {"counters"}}
	cmds := admin.Commands()
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range cmds {
			if !yield(n) {
				return
			}
		}
	})
	for _, host := range []string{"fe", "be1"} {
		for _, name := range names {
			a := args[name]
			if len(a) != cmds[name] {
				t.Fatalf("%s takes %d arguments; the test gives %q", name, cmds[name], a)
			}
			v, code := run(host, append([]string{name}, a...)...)
			m, _ := v.(map[string]any)
			if _, isErr := m["error"]; code != 0 && !isErr {
				t.Errorf("%s on %s: exit %d without a JSON error: %v", name, host, code, v)
			}
			if host == "fe" && code != 0 {
				t.Errorf("%s on the FE: exit %d: %v", name, code, v)
			}
		}
	}
	// The connection shows in both tables (a new one: kill reset the first).
	k2 := dialKeepAlive(t, c)
	defer k2.conn.Close()
	if _, err := k2.get("/index.html"); err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"fe", "be1"} {
		if v, _ := run(host, "conns"); v == nil || len(v.([]any)) == 0 {
			t.Errorf("conns on %s: no rows", host)
		}
	}
	// Refusals, an agent that is not there and a usage error: JSON, with
	// text mode's exit codes.
	for _, tc := range []struct {
		argv []string
		code int
	}{{[]string{"drain", "10.77.0.99"}, 1}, {[]string{"nosuch"}, 1}, {[]string{"weight", be1}, 1}} {
		v, code := run("fe", tc.argv...)
		if m, _ := v.(map[string]any); code != tc.code || m["error"] == nil {
			t.Errorf("%q: exit %d %v, want exit %d and an error", tc.argv, code, v, tc.code)
		}
	}
	for _, tc := range []struct {
		argv []string
		code int
	}{{[]string{"-s", c.Dir + "/nobody.sock", "-o", "json", "status"}, 1}, {[]string{"-o", "json"}, 2}} {
		out, err := exec.Command(ctlBin, tc.argv...).Output()
		var exit *exec.ExitError
		var v map[string]any
		if !errors.As(err, &exit) || exit.ExitCode() != tc.code || json.Unmarshal(out, &v) != nil || v["error"] == nil {
			t.Errorf("tcphactl %q: %v %q, want exit %d and a JSON error", tc.argv, err, out, tc.code)
		}
	}
}
