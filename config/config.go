// Package config parses tcpha.conf, the agent's ini file, into an immutable
// typed value. It keeps the option names, meanings and defaults of the TCPHA
// 0.1 README ("More details") and rejects anything it does not understand,
// naming the file, line, section and key.
package config

import (
	"fmt"
	"net/netip"

	"tcpha/backends"
	"time"
)

// DefaultPath is where tcpha-agent looks for its config without -c.
const DefaultPath = "/etc/tcpha/tcpha.conf"

// Config is one parsed tcpha.conf. FE and BE are nil when their section is
// absent; a host runs the roles whose sections are present.
type Config struct {
	File   string
	Global Global
	FE     *FE
	BE     *BE
	// Warnings are what Parse found legal but probably not meant (a
	// rule no request can reach, no catch-all rule), each as
	// "file:line: [section] key: what". `tcpha-agent -t` prints them;
	// the agent logs them at start and on reload.
	Warnings []string
}

// Global holds [global]: settings shared by both roles.
type Global struct {
	// LogLevel is the seed's dbglevel, 0 (errors only) to 6 (everything).
	LogLevel int
	// LogFile is where logs go; empty means stderr.
	LogFile string
	// AccessLog is the access log file (a line per request, package
	// accesslog); empty: none.
	AccessLog string
	// Admin is the path of the unix control socket.
	Admin string
	// Secret keys the proofs of every control handshake and the HMAC
	// carried by every control frame. A host that opens or accepts
	// control sessions (a BE, an FE with servers or registration) must
	// have one.
	Secret []byte
	// Metrics is the ADDR:PORT serving Prometheus text at /metrics; Pprof
	// the one serving Go profiles at /debug/pprof/. Empty: not served.
	Metrics, Pprof string
	// HandoverWait is how long an agent asked to quit (SIGQUIT) goes on
	// serving while it waits for a new agent to take over.
	HandoverWait time.Duration
}

// FE holds [fe]: the dispatcher that owns the VIP.
type FE struct {
	RAddr netip.Addr // real address; unspecified = INADDR_ANY
	VAddr netip.Addr // the VIP
	Port  uint16     // listening port on the VIP
	// VIP says who puts the VIP on the interface: VIPAgent, the agent
	// (added at start, announced, removed at stop), or VIPKeepalived,
	// keepalived's VRRP (issue 17), the agent then only listening on it.
	VIP VIPOwner
	// TLSPort is the VIP's TLS port (issue 16): connections there are
	// routed by the ClientHello's SNI and handed off without being
	// decrypted. 0: off.
	TLSPort         uint16
	StartServers    int
	MaxSpareServers int
	MinSpareServers int
	MaxClients      int // connections handled at one time
	ConnPerBE       int // persistent control connections kept per BE
	RedirectAddr    netip.Addr
	RedirectPort    uint16
	Servers         []backends.Server
	Rules           []backends.Rule
	// Scheduler is the default policy of rules naming several BEs.
	Scheduler backends.Policy
	// Check is the request each BE's agent sends its web server for a
	// probe, and the statuses that count as up ([fe] check,
	// checkexpect); a BE's own lines override it.
	Check backends.Check
	// Rise good probes make a BE available again, Fall bad ones
	// unavailable (seed 4.9 marked it at the first).
	Rise, Fall int
	// FEPort is where BEs register (seed 4.10), on RAddr; Port unless set.
	FEPort uint16
	// DRegister opens the registration port; without it BEs come only
	// from server lines.
	DRegister bool
	// SyncPeer is the other FE's raddr (issue 17): each FE streams its
	// flow changes to it over a control session on SyncPeer:feport, so
	// the peer's kernel already forwards every flow when the VIP moves.
	// Invalid: no sync.
	SyncPeer netip.Addr
	// PHTTP is what a BE does with a keep-alive connection's later
	// requests that the rules give another BE: "single" serves them
	// itself (TCPHA 0.2), "multi" moves the connection to that BE
	// (TCPHA 0.3), "forward" fetches them from that BE's web server.
	PHTTP string
	// Accept says who accepts new connections (issue 14): AcceptFE, the
	// FE (read, route, hand off), or AcceptBE, the BEs: the FE's packet
	// path places each new flow on a BE by hash, and the BE reads, routes
	// and moves it on if it is another BE's.
	Accept Accept
	// PinTimeout, with accept = be, is how long a placed flow keeps its
	// forwarding until it sends a request.
	PinTimeout time.Duration

	// Not in the seed; bounds the FE's work per connection.
	RequestTimeout time.Duration // time to receive a whole request header
	MaxHeader      int           // bytes allowed for a request header
	// MaxConnPerIP caps the connections from one client address still
	// sending their request head (0: no cap).
	MaxConnPerIP   int
	HandoffTimeout time.Duration // time for a BE to answer a handoff request
	TimeWait       time.Duration // forwarding kept after FIN/RST (seed 4.8.1 step 3)
	IdleTimeout    time.Duration // forwarding dropped after this long without a packet
	DtcInterval    time.Duration // BE detection interval (seed 4.9); 0 disables
	QueueNum       uint16        // NFQUEUE queue the FE agent reads
	Drain          time.Duration // on SIGTERM, how long handed-off connections may finish
}

// Accept is what [fe] accept names: who accepts new connections.
type Accept string

const (
	AcceptFE Accept = "fe"
	AcceptBE Accept = "be"
)

// VIPOwner is what [fe] vip names: who adds the VIP to the interface.
type VIPOwner string

const (
	VIPAgent      VIPOwner = "agent"
	VIPKeepalived VIPOwner = "keepalived"
)

// Redirect is the local node's web server address (seed 4.7); an unspecified
// redirectaddr means loopback.
func (f *FE) Redirect() netip.AddrPort { return redirect(f.RedirectAddr, f.RedirectPort) }

// Table is the FE's scheduling, as the backends package takes it.
func (f *FE) Table() backends.Table {
	return backends.Table{Servers: f.Servers, Rules: f.Rules, Policy: f.Scheduler}
}

// BE holds [be]: a real server that receives handed-off connections.
type BE struct {
	RAddr           netip.Addr
	UAddr           netip.Addr // an address the cluster does not use (ARP filtering)
	VAddr           netip.Addr
	Port            uint16 // handoff listener
	StartServers    int
	MaxSpareServers int
	MinSpareServers int
	MaxClients      int
	RedirectAddr    netip.Addr
	RedirectPort    uint16
	DRegister       bool
	// ForwardedFor: the relay tells the web server each request's client
	// in X-Forwarded-For (the web server's own peer is 127.0.0.1).
	ForwardedFor bool
	// RedirectTLSPort is the web server's TLS port on RedirectAddr: a
	// handed-off TLS connection is relayed there byte for byte.
	RedirectTLSPort uint16
	// ProxyProtocol starts each upstream TLS connection with a PROXY
	// protocol v2 header naming the client and the VIP.
	ProxyProtocol bool
	// FEAddrs are the FEs' real addresses: the only hosts (with the BEs
	// they list) whose control sessions this BE accepts.
	FEAddrs []netip.Addr
	FEPort  uint16
	Rules   []backends.Rule

	// Not in the seed: how long a restored connection waits for the FE's
	// commit before it is dropped silently.
	CommitTimeout time.Duration
	// KeepAliveTimeout is how long a client's connection may stay open
	// between requests; RequestTimeout and MaxHeader bound each later
	// request's head, as the FE bounds the first.
	KeepAliveTimeout time.Duration
	RequestTimeout   time.Duration
	MaxHeader        int
	// MaxConnPerIP, with the FE's accept = be, caps the connections from
	// one client address this BE accepted itself and serves at once (0:
	// no cap), as [fe] maxconnperip does on an FE.
	MaxConnPerIP int
	// Drain is how long relayed connections may finish on SIGTERM.
	Drain time.Duration
	// Check is this BE's own [be] check and checkexpect, over what the
	// FEs ask: Method empty when check is not given, Expect nil when
	// checkexpect is not (backends.Check.Override).
	Check backends.Check
	// Deliver is how the BE gives a handed-off connection to its web
	// server: through its relay, or onto the server's own socket (issue
	// 15, handoff/transplant), falling back to the relay per connection.
	Deliver Deliver
	// ClientAddr, with deliver = socket, dials the web server from the
	// client's own address and port (IP_TRANSPARENT), so that the server
	// sees the client; off, connections are prepared ahead from
	// 127.0.0.1 instead.
	ClientAddr bool
	// QueueNum is the NFQUEUE queue the BE agent reads delivered
	// connections' later requests from (deliver = socket).
	QueueNum uint16
}

// Deliver is what [be] deliver names.
type Deliver string

const (
	// DeliverRelay: the BE's relay copies between the rebuilt client
	// connection and a loopback connection to the web server.
	DeliverRelay Deliver = "relay"
	// DeliverSocket: the rebuilt client connection becomes the web
	// server's own socket; the server answers the client itself.
	DeliverSocket Deliver = "socket"
)

// Redirect is the unmodified local web server's address.
func (b *BE) Redirect() netip.AddrPort { return redirect(b.RedirectAddr, b.RedirectPort) }

// RedirectTLS is the local web server's TLS address.
func (b *BE) RedirectTLS() netip.AddrPort { return redirect(b.RedirectAddr, b.RedirectTLSPort) }

func redirect(a netip.Addr, port uint16) netip.AddrPort {
	if !a.IsValid() || a.IsUnspecified() {
		a = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	return netip.AddrPortFrom(a, port)
}

// Error is a config problem pinned to its place in the file.
type Error struct {
	File    string
	Line    int // 0 when the problem is a missing key or section
	Section string
	Key     string
	Msg     string
}

func (e *Error) Error() string {
	where := e.File
	if e.Line > 0 {
		where = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	switch {
	case e.Key != "":
		return fmt.Sprintf("%s: [%s] %s: %s", where, e.Section, e.Key, e.Msg)
	case e.Section != "":
		return fmt.Sprintf("%s: [%s]: %s", where, e.Section, e.Msg)
	default:
		return fmt.Sprintf("%s: %s", where, e.Msg)
	}
}
