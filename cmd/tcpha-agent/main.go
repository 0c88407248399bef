// Command tcpha-agent is tcpha's daemon: the TCP handoff front end, back
// end, or both, as its config file says.
//
//	tcpha-agent [-c /etc/tcpha/tcpha.conf]     run
//	tcpha-agent -t [-c FILE]                   check the config and exit
//
// SIGTERM or SIGINT stops it after handed-off connections drain (up to
// [fe]/[be] drain) and removes its tables and VIP; SIGQUIT exits at once and
// leaves them, and the next agent adopts the forwarding.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

	"tcpha/agent"
	"tcpha/config"
)

func main() {
	path := flag.String("c", config.DefaultPath, "config `file`")
	test := flag.Bool("t", false, "check the config file and exit")
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
	// SIGTERM/SIGINT drain and clean up; SIGQUIT hands over: the kernel
	// state stays for the next agent.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT)
	ctx, cancel := context.WithCancel(context.Background())
	var got atomic.Value
	go func() { got.Store(<-sigs); cancel() }()
	mode := func() agent.StopMode {
		if got.Load() == syscall.SIGQUIT {
			return agent.StopHandover
		}
		return agent.StopDrain
	}
	if err := agent.Run(ctx, cfg, log, mode); err != nil {
		log.Error("tcpha-agent failed", "op", "run", "err", err)
		closer.Close()
		os.Exit(1)
	}
}
