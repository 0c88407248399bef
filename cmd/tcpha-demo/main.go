// Command tcpha-demo builds a throw-away tcpha cluster in network
// namespaces (a client, an FE and two BEs running nginx, on one bridge),
// sends it requests, shows which BE served each and how many bytes the FE's
// NIC transmitted against the response size, then tears it all down.
//
//	tcpha-demo [-agent bin/tcpha-agent] [-bench]
//
// With -bench it also drives the cluster with wrk and prints requests per
// second for one-request connections (one handoff each) and keep-alive.
package main

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	cluster "tcpha/internal/nscluster"
)

func main() {
	agent := flag.String("agent", "bin/tcpha-agent", "tcpha-agent `binary`")
	bench := flag.Bool("bench", false, "also run wrk load against the cluster")
	flag.Parse()
	if os.Geteuid() != 0 {
		fail(fmt.Errorf("needs root: it creates network namespaces"))
	}
	abs, err := filepath.Abs(*agent)
	if err != nil {
		fail(err)
	}
	if _, err := os.Stat(abs); err != nil {
		fail(fmt.Errorf("agent binary: %w (run `make build`)", err))
	}
	if err := run(abs, *bench); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "tcpha-demo: %v\n", err)
	os.Exit(1)
}

func run(agent string, bench bool) error {
	fmt.Println("== building the cluster: client 10.77.0.10, FE 10.77.0.2, be1 10.77.0.11, be2 10.77.0.12, VIP 10.77.0.100")
	c, err := cluster.New(cluster.Options{
		Agent: agent, BEs: 2, Secret: "demo-cluster-secret",
		Rules: []string{`rule = be2 \.jpg$`, `rule = be1 .*`},
		// The relays name the client in X-Forwarded-For; nginx trusts
		// them (set_real_ip_from) and logs the client, not 127.0.0.1.
		BEExtra: "forwardedfor = on\n",
	})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("\n== tearing down")
		c.Close()
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() { <-sig; c.Close(); os.Exit(130) }()

	fmt.Printf("   FE rules:  rule = 10.77.0.12 \\.jpg$   rule = 10.77.0.11 .*\n")
	for _, h := range []string{"be1", "be2", "fe"} {
		if err := c.StartAgent(h); err != nil {
			return err
		}
	}
	big := make([]byte, 20<<20)
	rand.Read(big)
	if err := os.WriteFile(filepath.Join(c.WWW("be1"), "big.bin"), big, 0o644); err != nil {
		return err
	}

	fmt.Println("\n== requests from the client (curl), each on its own connection")
	fmt.Printf("   %-16s %-6s %-10s %12s %16s\n", "path", "status", "served by", "bytes", "FE NIC sent")
	for _, p := range []string{"/index.html", "/img/a.jpg", "/big.bin"} {
		if err := request(c, p); err != nil {
			return err
		}
	}
	fmt.Println("\n== two requests on one keep-alive connection (phttp = multi: be1 moves it to be2 for /img/a.jpg)")
	out, err := c.Output(context.Background(), "client", "curl", "-sS", "-m", "10",
		"-o", "/dev/null", "-w", "   %{url_effective}  served by %header{x-served-by}  new connections: %{num_connects}\n",
		"http://"+cluster.VIP+"/index.html", "-o", "/dev/null", "http://"+cluster.VIP+"/img/a.jpg")
	if err != nil {
		return err
	}
	fmt.Print(out)

	fmt.Println("\n== nginx's access log on each BE: the client's address, not the relay's ([be] forwardedfor = on)")
	for _, h := range []string{"be1", "be2"} {
		log, _ := os.ReadFile(filepath.Join(c.Dir, h, "access.log"))
		lines := strings.Split(strings.TrimSpace(string(log)), "\n")
		for _, l := range lines[max(0, len(lines)-2):] {
			if f := strings.Fields(l); len(f) > 6 {
				fmt.Printf("   %s: client %-12s %s %s\n", h, f[0], strings.Trim(f[5], `"`), f[6])
			}
		}
	}

	fmt.Println("\n== the FE's connection table (tcphactl conns)")
	conns, _ := c.Admin("fe", "conns")
	fmt.Print(indent(conns))
	fmt.Println("\n== the FE's forwarding map (nft list map ip tcpha forward)")
	m, _ := c.Output(context.Background(), "fe", "nft", "list", "map", "ip", "tcpha", "forward")
	fmt.Print(indent(m))
	st, _ := c.Admin("fe", "status")
	fmt.Println("\n== FE status (tcphactl status)")
	fmt.Print(indent(st))
	bs, _ := c.Admin("fe", "backends")
	fmt.Println("\n== the BEs as the FE's probes see them (tcphactl backends)")
	fmt.Print(indent(bs))

	if bench {
		return runBench(c)
	}
	return nil
}

func request(c *cluster.Cluster, path string) error {
	before, err := c.Counter("fe", "tx_bytes")
	if err != nil {
		return err
	}
	out, err := c.Output(context.Background(), "client", "curl", "-sS", "-m", "30", "-o", "/dev/null",
		"-w", "%{http_code} %header{x-served-by} %{size_download}", "http://"+cluster.VIP+path)
	if err != nil {
		return err
	}
	after, _ := c.Counter("fe", "tx_bytes")
	f := strings.Fields(out)
	if len(f) != 3 {
		return fmt.Errorf("unexpected curl output %q", out)
	}
	fmt.Printf("   %-16s %-6s %-10s %12s %16s\n", path, f[0], f[1], f[2], strconv.FormatUint(after-before, 10))
	return nil
}

var reqRate = regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)

func runBench(c *cluster.Cluster) error {
	fmt.Println("\n== wrk, 20 connections, 5 s each (client, FE, BEs and nginx share this machine's cores)")
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"one request per connection (a handoff each)", []string{"-H", "Connection: close"}},
		{"keep-alive (one handoff per connection)", nil},
	} {
		args := append([]string{"wrk", "-t", "2", "-c", "20", "-d", "5s"}, tc.args...)
		args = append(args, "http://"+cluster.VIP+"/index.html")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		out, err := c.Output(ctx, "client", args...)
		cancel()
		if err != nil {
			return err
		}
		rate := "?"
		if m := reqRate.FindStringSubmatch(out); m != nil {
			rate = m[1]
		}
		errs := ""
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "Socket errors") || strings.Contains(l, "Non-2xx") {
				errs += " " + strings.TrimSpace(l)
			}
		}
		fmt.Printf("   %-46s %10s req/s%s\n", tc.name, rate, errs)
	}
	st, _ := c.Admin("fe", "status")
	fmt.Print(indent(st))
	return nil
}

func indent(s string) string {
	if strings.TrimSpace(s) == "" {
		return "   (empty)\n"
	}
	return "   " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n   ") + "\n"
}
