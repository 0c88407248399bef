// Command tcphactl talks to a running tcpha-agent over its admin socket.
//
//	tcphactl [-s /run/tcpha/admin.sock] status|conns
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"
)

func main() {
	sock := flag.String("s", "/run/tcpha/admin.sock", "admin `socket` (the config's [global] admin)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: tcphactl [-s socket] status|conns")
		os.Exit(2)
	}
	c, err := net.DialTimeout("unix", *sock, 2*time.Second)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tcphactl: %v (is tcpha-agent running?)\n", err)
		os.Exit(1)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintln(c, flag.Arg(0))
	if _, err := io.Copy(os.Stdout, c); err != nil {
		fmt.Fprintf(os.Stderr, "tcphactl: %v\n", err)
		os.Exit(1)
	}
}
