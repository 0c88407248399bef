// Command tcphactl controls a running tcpha-agent over its admin socket,
// as ipvsadm does IPVS.
//
//	tcphactl [-c /etc/tcpha/tcpha.conf | -s SOCKET] [-o text|json] COMMAND [ARGS]
//
//	status                  version, uptime, the agent's counters and its BEs
//	backends                each BE: AVAILABLE or NOTAVAILABLE (MAINT, DRAINING), weight, load, handoffs,
//	                        failures, last state change, downtime, last probe
//	rates                   each BE's connections, requests and bytes in and out per second: now and peak
//	rules                   the running rules, in order, with the requests each routed
//	conns [be=ADDR] [state=STATE] [client=ADDR[:PORT]|PREFIX]
//	                        the connection table, filtered
//	loglevel N              0 (errors) to 6 (everything)
//	dtcinterval SECONDS     the FE's probe interval; 0 turns detection off (not negative)
//	drain ADDR              no new connections to the BE; open ones finish
//	enable ADDR             undo drain
//	maint ADDR              force the BE down (NOTAVAILABLE whatever its probes say); open connections stay
//	ready ADDR              undo maint
//	kill ADDR               reset every connection handed off to the BE
//	weight ADDR N           the BE's weight, until the next reload
//	clear counters          zero handoffs, failures, downtime, rule hits and peaks
//	reload                  re-read the config file, as SIGHUP does
//
// Without -s it finds the admin socket in the config file. It exits 0 on
// success, 1 when the agent refuses the command or cannot be reached, 2 on
// a usage error. With -o json an error is JSON too, {"error": "..."} on
// stdout, with the same exit code.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"tcpha/admin"
	"tcpha/config"
	"tcpha/internal/version"
)

const usage = `usage: tcphactl [-c CONFIG | -s SOCKET] [-o text|json] COMMAND [ARGS]
commands: status, backends, rates, rules, conns [be=ADDR] [state=STATE] [client=ADDR],
          loglevel N, dtcinterval SECONDS, drain ADDR, enable ADDR, maint ADDR,
          ready ADDR, kill ADDR, weight ADDR N, clear counters, reload`

func main() {
	conf := flag.String("c", config.DefaultPath, "config `file` naming the admin socket")
	sock := flag.String("s", "", "admin `socket` (default: the config's [global] admin)")
	out := flag.String("o", "text", "output `format`: text or json")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Usage = func() { fmt.Fprintln(os.Stderr, usage); flag.PrintDefaults() }
	flag.Parse()
	if *showVersion {
		fmt.Println("tcphactl", version.String())
		return
	}
	jsonOut := *out == "json"
	if flag.NArg() == 0 || (*out != "text" && *out != "json") {
		if jsonOut {
			writeError(os.Stdout, os.Stderr, true, errors.New(strings.ReplaceAll(usage, "\n", " ")))
		} else {
			flag.Usage()
		}
		os.Exit(2)
	}
	path := *sock
	if path == "" {
		cfg, err := config.Load(*conf)
		if err != nil {
			os.Exit(writeError(os.Stdout, os.Stderr, jsonOut, fmt.Errorf("%w (or name the socket with -s)", err)))
		}
		path = cfg.Global.Admin
	}
	req := strings.Join(flag.Args(), " ")
	if jsonOut {
		req = "json " + req
	}
	os.Exit(run(path, req, jsonOut, os.Stdout, os.Stderr))
}

// run sends one request and copies the answer; it returns the exit code.
func run(path, req string, jsonOut bool, stdout, stderr io.Writer) int {
	out, err := admin.Do(path, req, 10*time.Second)
	var refused *admin.RefusedError
	var op *net.OpError
	switch {
	case errors.As(err, &refused):
		return writeError(stdout, stderr, jsonOut, errors.New(refused.Why))
	case errors.As(err, &op) && op.Op == "dial":
		return writeError(stdout, stderr, jsonOut, fmt.Errorf("%w (is tcpha-agent running?)", err))
	case err != nil:
		return writeError(stdout, stderr, jsonOut, err)
	}
	if _, err := io.WriteString(stdout, out); err != nil {
		fmt.Fprintf(stderr, "tcphactl: %v\n", err)
		return 1
	}
	return 0
}

// jsonError is an error as `tcphactl -o json` writes it.
type jsonError struct {
	Error string `json:"error"`
}

// writeError reports err, as JSON on stdout for -o json (a script reads
// one stream), else on stderr; it returns the exit code, 1.
func writeError(stdout, stderr io.Writer, jsonOut bool, err error) int {
	if jsonOut {
		b, _ := json.MarshalIndent(jsonError{Error: err.Error()}, "", "  ")
		fmt.Fprintf(stdout, "%s\n", b)
	} else {
		fmt.Fprintf(stderr, "tcphactl: %v\n", err)
	}
	return 1
}
