// Command tcpha-agent is tcpha's daemon: the TCP handoff front end, back
// end, or both, as its config file says.
//
//	tcpha-agent [-c /etc/tcpha/tcpha.conf]     run
//	tcpha-agent -upgrade [-c FILE]             replace the running agent
//	tcpha-agent -t [-c FILE]                   check the config and exit
//	tcpha-agent -version                       print the version
//
// SIGHUP re-reads the config file (rules, servers, weights, timings) and
// reopens the log file and the access log; a file that does not parse
// changes nothing.
// SIGUSR2 upgrades in place: the agent starts its program file again with
// -upgrade (under systemd: systemctl kill -s USR2 tcpha-agent).
//
// SIGTERM or SIGINT stops it after handed-off connections drain (up to
// [fe]/[be] drain) and removes its tables and VIP. SIGQUIT asks it to hand
// over: it goes on serving until a new agent takes over its sockets (a
// plain start does), or for [global] handoverwait (30 s), then exits and
// leaves its tables and VIP for the next agent. -upgrade takes over from a
// running agent at once. A handover refuses no client and cuts no relayed
// transfer (docs/design.md, "Stopping, crashing, restarting").
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"tcpha/agent"
	"tcpha/config"
	"tcpha/handover"
	"tcpha/internal/version"
)

func main() {
	path := flag.String("c", config.DefaultPath, "config `file`")
	test := flag.Bool("t", false, "check the config file and exit")
	upgrade := flag.Bool("upgrade", false, "take over from the running agent: its listeners, clients and relayed connections")
	showVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()
	if *showVersion {
		fmt.Println("tcpha-agent", version.String())
		return
	}
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "tcpha-agent: unexpected argument %q (flags: -c FILE, -t, -upgrade, -version)\n", flag.Arg(0))
		os.Exit(2)
	}
	cfg, err := config.Load(*path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tcpha-agent: %v\n", err)
		os.Exit(1)
	}
	if *test {
		os.Exit(check(*path, cfg))
	}
	// Under systemd stderr goes to the journal, which reads priorities.
	log, err := agent.NewLogger(cfg.Global, os.Stderr, os.Getenv("JOURNAL_STREAM") != "")
	if err != nil {
		fmt.Fprintf(os.Stderr, "tcpha-agent: %v\n", err)
		os.Exit(1)
	}
	defer log.Close()
	fail := func(what string, err error) {
		log.Error(what, "op", "start", "err", err)
		fmt.Fprintf(os.Stderr, "tcpha-agent: %v\n", err)
		log.Close()
		os.Exit(1)
	}
	// A plain start takes over from an agent that was asked to quit; with
	// -upgrade, from any running agent.
	in, err := handover.TakeOver(cfg.Global.Admin, *upgrade)
	if err != nil {
		fail("tcpha-agent cannot start", err)
	}
	exe, err := os.Executable()
	if err != nil {
		log.Warn("cannot find this program's file: SIGUSR2 will not upgrade", "op", "start", "err", err)
	}
	// SIGTERM/SIGINT drain and clean up; SIGQUIT hands over to the next
	// agent; SIGUSR2 starts that agent (upgrade in place); SIGHUP reloads.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGUSR2, syscall.SIGHUP)
	ctx, cancel := context.WithCancel(context.Background())
	quit, reload := make(chan struct{}), make(chan struct{}, 1)
	go func() {
		quitOnce := sync.OnceFunc(func() { close(quit) })
		for sig := range sigs {
			switch sig {
			case syscall.SIGQUIT:
				quitOnce()
			case syscall.SIGUSR2:
				if exe != "" {
					reexec(exe, *path, log)
				}
			case syscall.SIGHUP:
				select {
				case reload <- struct{}{}:
				default: // one is pending already
				}
			default:
				// A drain longer than the unit's TimeoutStopSec allows
				// must not end in a SIGKILL that leaves the tables.
				notify(log, fmt.Sprintf("STOPPING=1\nEXTEND_TIMEOUT_USEC=%d", agent.StopTime(cfg).Microseconds()))
				cancel()
			}
		}
	}()
	ready := func() {
		// Under systemd (Type=notify) a successor becomes the unit's main
		// process; its predecessor exits once it has handed over.
		msg := "READY=1\nSTATUS=serving " + roles(cfg)
		if in != nil {
			msg = fmt.Sprintf("MAINPID=%d\n%s", os.Getpid(), msg)
		}
		notify(log, msg)
	}
	// The main loop feeds the watchdog while the roles answer.
	wdog, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("systemd watchdog", "op", "start", "err", err)
	}
	err = agent.Run(ctx, cfg, log, agent.Options{
		Inherited: in, Quit: quit, Ready: ready, Reload: reload,
		Notify:   func(state string) { notify(log, state) },
		Watchdog: wdog,
	})
	if err != nil {
		log.Error("tcpha-agent failed", "op", "run", "err", err)
		log.Close()
		os.Exit(1)
	}
}

// check is -t: the file parses (already done), and what the agent will
// open can be opened. It returns the exit code.
func check(path string, cfg *config.Config) int {
	for _, kf := range [][2]string{{"logfile", cfg.Global.LogFile}, {"accesslog", cfg.Global.AccessLog}} {
		key, f := kf[0], kf[1]
		if f == "" {
			continue
		}
		if err := writable(f); err != nil {
			fmt.Fprintf(os.Stderr, "tcpha-agent: %s: [global] %s %s: %v\n", path, key, f, err)
			return 1
		}
	}
	// Warnings are no refusal: the config runs as written, as nginx -t
	// prints its [warn] lines and still says ok.
	for _, w := range cfg.Warnings {
		fmt.Fprintf(os.Stderr, "tcpha-agent: warning: %s\n", w)
	}
	fmt.Printf("tcpha-agent: %s: syntax is ok, roles: %s\n", path, roles(cfg))
	return 0
}

// writable tells whether the agent could append to the file at path
// (creating it if need be) without touching it.
func writable(path string) error {
	if _, err := os.Stat(path); err == nil {
		return unix.Access(path, unix.W_OK)
	}
	dir := filepath.Dir(path)
	if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
		return fmt.Errorf("cannot create it in %s: %w", dir, err)
	}
	return nil
}

func roles(cfg *config.Config) string {
	switch {
	case cfg.FE != nil && cfg.BE != nil:
		return "fe be"
	case cfg.FE != nil:
		return "fe"
	}
	return "be"
}

// notify tells systemd about the agent's state, when it runs under it.
func notify(log *agent.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("systemd notification", "op", "notify", "err", err)
	}
}

// reexec starts the program file exe (the upgraded binary, when a package
// replaced it) with -upgrade: the new agent takes over from this one, which
// exits once it has handed over. If the new one fails first, this one goes
// on as before.
func reexec(exe, conf string, log *agent.Logger) {
	cmd := exec.Command(exe, "-upgrade", "-c", conf)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		log.Error("upgrade: cannot start the new agent", "op", "upgrade", "exe", exe, "err", err)
		return
	}
	log.Info("upgrade: started the new agent", "op", "upgrade", "exe", exe, "pid", cmd.Process.Pid)
	go func() {
		if err := cmd.Wait(); err != nil {
			log.Error("upgrade: the new agent failed; this one goes on", "op", "upgrade", "pid", cmd.Process.Pid, "err", err)
		}
	}()
}
