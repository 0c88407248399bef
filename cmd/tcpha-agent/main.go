// Command tcpha-agent is tcpha's daemon: the TCP handoff front end, back
// end, or both, as its config file says.
//
//	tcpha-agent [-c /etc/tcpha/tcpha.conf]     run
//	tcpha-agent -upgrade [-c FILE]             replace the running agent
//	tcpha-agent -t [-c FILE]                   check the config and exit
//
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
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"

	"tcpha/agent"
	"tcpha/config"

	"github.com/coreos/go-systemd/v22/daemon"
)

func main() {
	path := flag.String("c", config.DefaultPath, "config `file`")
	test := flag.Bool("t", false, "check the config file and exit")
	upgrade := flag.Bool("upgrade", false, "take over from the running agent: its listeners, clients and relayed connections")
	flag.Parse()

	cfg, err := config.Load(*path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tcpha-agent: %v\n", err)
		os.Exit(1)
	}
	if *test {
		roles := ""
		if cfg.FE != nil {
			roles += " fe"
		}
		if cfg.BE != nil {
			roles += " be"
		}
		fmt.Printf("tcpha-agent: %s: syntax is ok, roles:%s\n", *path, roles)
		if len(cfg.Global.Secret) == 0 {
			fmt.Fprintf(os.Stderr, "tcpha-agent: warning: %s: no [global] secret: control sessions are not "+
				"authenticated, and a BE obeys any connection from its feaddr; set the same secret on every host\n", *path)
		}
		return
	}
	log, closer, err := agent.NewLogger(cfg.Global, os.Stderr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tcpha-agent: %v\n", err)
		os.Exit(1)
	}
	defer closer.Close()
	// A plain start takes over from an agent that was asked to quit; with
	// -upgrade, from any running agent.
	in, err := agent.TakeOver(cfg.Global.Admin, *upgrade)
	if err != nil {
		log.Error("tcpha-agent cannot start", "op", "start", "err", err)
		fmt.Fprintf(os.Stderr, "tcpha-agent: %v\n", err)
		closer.Close()
		os.Exit(1)
	}
	// SIGTERM/SIGINT drain and clean up; SIGQUIT hands over to the next
	// agent; SIGUSR2 starts that agent (upgrade in place).
	exe, err := os.Executable()
	if err != nil {
		log.Warn("cannot find this program's file: SIGUSR2 will not upgrade", "op", "start", "err", err)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGUSR2)
	ctx, cancel := context.WithCancel(context.Background())
	quit := make(chan struct{})
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
			default:
				cancel()
			}
		}
	}()
	ready := func() {
		// Under systemd (Type=notify) a successor becomes the unit's main
		// process; its predecessor exits once it has handed over.
		msg := "READY=1"
		if in != nil {
			msg = fmt.Sprintf("MAINPID=%d\nREADY=1", os.Getpid())
		}
		if _, err := daemon.SdNotify(false, msg); err != nil {
			log.Warn("systemd notification", "op", "start", "err", err)
		}
	}
	err = agent.Run(ctx, cfg, log, agent.Options{Inherited: in, Quit: quit, Ready: ready})
	if err != nil {
		log.Error("tcpha-agent failed", "op", "run", "err", err)
		closer.Close()
		os.Exit(1)
	}
}

// reexec starts the program file exe (the upgraded binary, when a package
// replaced it) with -upgrade: the new agent takes over from this one, which
// exits once it has handed over. If the new one fails first, this one goes
// on as before.
func reexec(exe, conf string, log *slog.Logger) {
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
