// Package handover is the upgrade protocol: it hands a running agent's
// sockets to its successor over the admin socket, as HAProxy's
// `expose-fd listeners` does. The successor
// sends "upgrade" (tcpha-agent -upgrade: take over whatever the agent is
// doing) or "takeover" (a plain start: take over only from an agent that
// was asked to quit, SIGQUIT). The running agent answers with frames, each
// a JSON message and the descriptors it names (SCM_RIGHTS):
//
//	start:    the listeners (the FE's VIP:port, the BE's control port)
//	successor → "go\n" once it has started (its BE serves on the control
//	          listener); until then the running agent changes nothing, and
//	          a successor that fails leaves it serving. From now on the
//	          successor accepts on the listeners too, and the BE's control
//	          sessions move to it (ctl.Server.Drain)
//	sessions: connections and where they stood: the FE's clients still
//	          sending their request heads, the BE's relayed connections
//	          with their upstream connections, 100 at a time
//	released: the queue, the nft table's ownership, the admin socket and
//	          the metrics port are free; the successor's FE starts
//	done:     nothing follows (the BE's sessions may come after released)
//
// or, refusing, one frame: refused, with the reason. A frame is a 4-byte
// big-endian length and the JSON; its descriptors ride on the frame's
// first byte. A predecessor that dies midway releases by dying. A frame's
// kind is a Kind and a listener's name a ListenerName: typed here, their
// names on the wire, so that agents of different versions understand one
// another.
package handover

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"tcpha/admin"
	"tcpha/backends"
	"tcpha/frontend"
	"tcpha/relay"
)

// Kind is what a frame says.
type Kind uint8

const (
	KindStart    Kind = iota + 1 // the listeners and the FE's registered BEs
	KindSessions                 // handed connections, with their descriptors
	KindReleased                 // what only one agent may hold is free
	KindDone                     // nothing follows
	KindRefused                  // the agent does not hand over, and why
)

var kindNames = map[Kind]string{KindStart: "start", KindSessions: "sessions", KindReleased: "released",
	KindDone: "done", KindRefused: "refused"}

func (k Kind) String() string {
	if n, ok := kindNames[k]; ok {
		return n
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// MarshalText writes the kind's name, as the frames always carried it.
func (k Kind) MarshalText() ([]byte, error) {
	n, ok := kindNames[k]
	if !ok {
		return nil, fmt.Errorf("handover: unknown frame kind %d", uint8(k))
	}
	return []byte(n), nil
}

// UnmarshalText reads a kind's name; an unknown one is an error, so that
// a frame this agent does not understand is never taken for another.
func (k *Kind) UnmarshalText(b []byte) error {
	for kind, n := range kindNames {
		if n == string(b) {
			*k = kind
			return nil
		}
	}
	return fmt.Errorf("handover: unknown frame kind %q", b)
}

// ListenerName says which listener a start frame's descriptor is.
type ListenerName string

const (
	ListenerVIP      ListenerName = "vip"      // the FE's VIP:port
	ListenerRegister ListenerName = "register" // the FE's registration port
	ListenerTLS      ListenerName = "tls"      // the FE's VIP:tlsport
	ListenerControl  ListenerName = "control"  // the BE's control port
	ListenerBEVIP    ListenerName = "be-vip"   // the BE's VIP:port, with the FE's accept = be
)

// frame is one message of the upgrade.
type frame struct {
	Kind Kind `json:"kind"`
	// start: which listeners the descriptors are, in order, and the FE's
	// registered BEs.
	Listeners  []ListenerName `json:"listeners,omitempty"`
	Registered []registration `json:"registered,omitempty"`
	// sessions: each takes one descriptor (the client), or two when
	// Upstream is set.
	Sessions []session `json:"sessions,omitempty"`
	// refused: why.
	Reason string `json:"reason,omitempty"`
}

// registration is a BE registered with the FE (seed 4.10): the successor
// schedules it until the BE registers again with it.
type registration struct {
	BE       netip.AddrPort `json:"be"`
	Weight   int            `json:"weight"`
	Patterns []string       `json:"patterns"`
}

type session struct {
	// Head is set for an FE client still sending its request head: what
	// was read of it, and by when the rest must come.
	Head     []byte    `json:"head,omitempty"`
	Deadline time.Time `json:"deadline,omitzero"`
	IsHead   bool      `json:"is_head,omitempty"`
	// Otherwise it is a BE's relayed connection.
	Upstream bool        `json:"upstream,omitempty"`
	State    relay.State `json:"state,omitzero"`
}

const (
	maxFramePayload = 16 << 20
	// maxFramesFDs stays under the kernel's SCM_MAX_FD (253).
	sessionsPerFrame = 100
)

// sendFrame writes f with the descriptors of files.
func sendFrame(c *net.UnixConn, f frame, files []*os.File) error {
	body, err := json.Marshal(f)
	if err != nil {
		return err
	}
	msg := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	msg = append(msg, body...)
	var oob []byte
	if len(files) > 0 {
		fds := make([]int, len(files))
		for i, f := range files {
			fds[i] = int(f.Fd())
		}
		oob = unix.UnixRights(fds...)
	}
	// The descriptors go with the first write; a short write sends the rest
	// plainly.
	n, _, err := c.WriteMsgUnix(msg, oob, nil)
	if err != nil {
		return fmt.Errorf("send %s frame: %w", f.Kind, err)
	}
	if n < len(msg) {
		if _, err := c.Write(msg[n:]); err != nil {
			return fmt.Errorf("send %s frame: %w", f.Kind, err)
		}
	}
	return nil
}

// recvFrame reads one frame and the descriptors that came with it.
func recvFrame(c *net.UnixConn) (frame, []*os.File, error) {
	var f frame
	var hdr [4]byte
	oob := make([]byte, unix.CmsgSpace(4*sessionsPerFrame*2+16))
	n, oobn, _, _, err := c.ReadMsgUnix(hdr[:], oob)
	if err != nil {
		return f, nil, err
	}
	var files []*os.File
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return f, nil, fmt.Errorf("handover: control message: %w", err)
		}
		for _, m := range msgs {
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				files = append(files, os.NewFile(uintptr(fd), "handed"))
			}
		}
	}
	if n < len(hdr) {
		if _, err := io.ReadFull(c, hdr[n:]); err != nil {
			closeAll(files)
			return f, nil, err
		}
	}
	size := binary.BigEndian.Uint32(hdr[:])
	if size > maxFramePayload {
		closeAll(files)
		return f, nil, fmt.Errorf("handover: frame of %d bytes", size)
	}
	body := make([]byte, size)
	if _, err := io.ReadFull(c, body); err != nil {
		closeAll(files)
		return f, nil, err
	}
	if err := json.Unmarshal(body, &f); err != nil {
		closeAll(files)
		return f, nil, fmt.Errorf("handover: %w", err)
	}
	return f, files, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// Inherited is what a successor got from the agent it replaces.
type Inherited struct {
	conn *net.UnixConn
	// VIP and Register are the FE's listeners, Control the BE's, when the
	// predecessor had them; Registered its FE's registered BEs.
	VIP, Register, Control net.Listener
	// TLS is the FE's VIP:tlsport listener.
	TLS net.Listener
	// BEVIP is the BE's VIP:port listener (accept = be).
	BEVIP      net.Listener
	Registered []backends.Registration
}

// TakeOver asks the agent at adminPath to hand over, and returns its
// listeners; Receive takes the rest. With force (tcpha-agent -upgrade) the
// agent hands over whatever it is doing, and one must be running; without,
// it does only once asked to quit, and (nil, nil) means no agent answers.
func TakeOver(adminPath string, force bool) (*Inherited, error) {
	c, err := net.DialTimeout("unix", adminPath, time.Second)
	if err != nil {
		if force {
			return nil, fmt.Errorf("upgrade: no running agent at %s: %w", adminPath, err)
		}
		return nil, nil
	}
	uc := c.(*net.UnixConn)
	cmd := "takeover\n"
	if force {
		cmd = "upgrade\n"
	}
	// The agent answers start at once; the deadline is for an agent that
	// does not answer at all.
	uc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(uc, cmd); err != nil {
		uc.Close()
		return nil, fmt.Errorf("admin socket %s: %w", adminPath, err)
	}
	f, files, err := recvFrame(uc)
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("admin socket %s: the running agent did not hand over: %w", adminPath, err)
	}
	uc.SetDeadline(time.Time{})
	defer closeAll(files)
	if f.Kind == KindRefused {
		uc.Close()
		return nil, fmt.Errorf("admin socket %s: %w (%s)", adminPath, admin.ErrAgentRunning, f.Reason)
	}
	if f.Kind != KindStart || len(f.Listeners) != len(files) {
		uc.Close()
		return nil, fmt.Errorf("admin socket %s: got %v with %d descriptors, want start with %d", adminPath, f.Kind, len(files), len(f.Listeners))
	}
	in := &Inherited{conn: uc}
	for _, hr := range f.Registered {
		reg, err := backends.Registered(hr.BE, hr.Weight, hr.Patterns)
		if err != nil {
			continue // the predecessor compiled it: not expected
		}
		in.Registered = append(in.Registered, reg)
	}
	for i, name := range f.Listeners {
		ln, err := net.FileListener(files[i])
		if err != nil {
			in.Close()
			return nil, fmt.Errorf("upgrade: the %s listener: %w", name, err)
		}
		switch name {
		case ListenerVIP:
			in.VIP = ln
		case ListenerControl:
			in.Control = ln
		case ListenerRegister:
			in.Register = ln
		case ListenerTLS:
			in.TLS = ln
		case ListenerBEVIP:
			in.BEVIP = ln
		default:
			ln.Close()
		}
	}
	return in, nil
}

// Handed is one connection a predecessor handed over: an FE client still
// sending its head, or a BE's relayed session.
type Handed struct {
	Head  *frontend.HandedHead
	Relay *relay.Handed
}

// Close closes the connection's sockets.
func (h Handed) Close() {
	if h.Head != nil {
		h.Head.Conn.Close()
	}
	if h.Relay != nil {
		h.Relay.Client.Close()
		if h.Relay.Upstream != nil {
			h.Relay.Upstream.Close()
		}
	}
}

// Receive passes each handed connection to take, and calls released when
// the predecessor has let go of what only one agent may hold, until it is
// done (or gone: a predecessor that dies midway releases by dying, and
// released is then called on its way out).
func (in *Inherited) Receive(take func(Handed), released func()) error {
	defer in.conn.Close()
	rel := false
	release := func() {
		if !rel {
			rel = true
			released()
		}
	}
	defer release()
	for {
		f, files, err := recvFrame(in.conn)
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("upgrade: %w", err)
		}
		switch f.Kind {
		case KindReleased:
			closeAll(files)
			release()
		case KindDone:
			closeAll(files)
			return nil
		case KindSessions:
			i := 0
			next := func() *net.TCPConn {
				if i >= len(files) {
					return nil
				}
				c, err := net.FileConn(files[i])
				i++
				if err != nil {
					return nil
				}
				return c.(*net.TCPConn)
			}
			for _, s := range f.Sessions {
				var h Handed
				client := next()
				switch {
				case client == nil:
					continue
				case s.IsHead:
					h.Head = &frontend.HandedHead{Conn: client, Read: s.Head, Deadline: s.Deadline}
				default:
					h.Relay = &relay.Handed{Client: client, State: s.State}
					if s.Upstream {
						if h.Relay.Upstream = next(); h.Relay.Upstream == nil {
							client.Close()
							continue
						}
					}
				}
				take(h)
			}
			closeAll(files)
		default:
			closeAll(files)
			return fmt.Errorf("upgrade: unexpected %v frame", f.Kind)
		}
	}
}

// startWait bounds how long an agent waits for its successor to start.
const startWait = 30 * time.Second

// Go tells the predecessor that this agent has started (its BE serves on
// the inherited control listener): it may stop its own work now.
func (in *Inherited) Go() error {
	in.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	defer in.conn.SetWriteDeadline(time.Time{})
	_, err := io.WriteString(in.conn, "go\n")
	return err
}

// Close gives up what was inherited and not yet used.
func (in *Inherited) Close() {
	in.CloseListeners()
	in.conn.Close()
}

// CloseListeners closes the listeners no role took.
func (in *Inherited) CloseListeners() {
	if in.VIP != nil {
		in.VIP.Close()
		in.VIP = nil
	}
	if in.Control != nil {
		in.Control.Close()
		in.Control = nil
	}
	if in.BEVIP != nil {
		in.BEVIP.Close()
		in.BEVIP = nil
	}
	if in.Register != nil {
		in.Register.Close()
		in.Register = nil
	}
	if in.TLS != nil {
		in.TLS.Close()
		in.TLS = nil
	}
}

// sender writes frames to a successor from more than one goroutine.
type sender struct {
	mu sync.Mutex
	c  *net.UnixConn
}

func (s *sender) frame(f frame, files []*os.File) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return sendFrame(s.c, f, files)
}

// send passes handed connections to the successor, 100 a frame, and closes
// this process's copies.
func (s *sender) send(hs []Handed) error {
	for start := 0; start < len(hs); start += sessionsPerFrame {
		batch := hs[start:min(start+sessionsPerFrame, len(hs))]
		f := frame{Kind: KindSessions}
		var files []*os.File
		add := func(c *net.TCPConn) error {
			cf, err := c.File()
			if err != nil {
				return fmt.Errorf("upgrade: %w", err)
			}
			files = append(files, cf)
			return nil
		}
		var err error
		for _, h := range batch {
			switch {
			case h.Head != nil:
				f.Sessions = append(f.Sessions, session{IsHead: true, Head: h.Head.Read, Deadline: h.Head.Deadline})
				err = add(h.Head.Conn)
			default:
				f.Sessions = append(f.Sessions, session{Upstream: h.Relay.Upstream != nil, State: h.Relay.State})
				if err = add(h.Relay.Client); err == nil && h.Relay.Upstream != nil {
					err = add(h.Relay.Upstream)
				}
			}
			if err != nil {
				break
			}
		}
		if err == nil {
			err = s.frame(f, files)
		}
		closeAll(files)
		for _, h := range batch {
			h.Close()
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// Refuse tells a successor that this agent does not hand over, and why.
func Refuse(c *net.UnixConn, reason string) error {
	return sendFrame(c, frame{Kind: KindRefused, Reason: reason}, nil)
}

// Listener is one of the listeners a predecessor hands over.
type Listener struct {
	Name ListenerName
	Ln   net.Listener
}

// Roles are what a predecessor hands over: its listeners and registered
// BEs, and its roles' work. BE and FE, when set, stop the role's work and
// return the connections to hand over; Release lets go of what only one
// agent may hold.
type Roles struct {
	Listeners  []Listener
	Registered []backends.Registration
	BE         func() []relay.Handed
	FE         func() []frontend.HandedHead
	Release    func()
	Log        *slog.Logger
}

// Give hands this agent's sockets to the successor on c. An error before
// the successor said it started leaves the agent serving as before (and
// Release uncalled); after, the agent is past the point of no return.
func Give(c *net.UnixConn, r Roles) (released bool, err error) {
	out := &sender{c: c}
	var names []string
	var files []*os.File
	first := frame{Kind: KindStart}
	for _, l := range r.Listeners {
		f, err := l.Ln.(*net.TCPListener).File()
		if err != nil {
			closeAll(files)
			return false, fmt.Errorf("upgrade: the %s listener: %w", l.Name, err)
		}
		first.Listeners, files = append(first.Listeners, l.Name), append(files, f)
		names = append(names, string(l.Name))
	}
	for _, reg := range r.Registered {
		hr := registration{BE: reg.Server.AddrPort(), Weight: reg.Server.Weight}
		for _, x := range reg.Rules {
			hr.Patterns = append(hr.Patterns, x.Pattern.String())
		}
		first.Registered = append(first.Registered, hr)
	}
	err = out.frame(first, files)
	closeAll(files)
	if err != nil {
		return false, err
	}
	// Nothing stops here before the new agent says it started: one that
	// fails (a bad config, a missing capability) leaves this one serving.
	c.SetReadDeadline(time.Now().Add(startWait))
	line, err := bufio.NewReader(c).ReadString('\n')
	c.SetReadDeadline(time.Time{})
	if err != nil || strings.TrimSpace(line) != "go" {
		return false, fmt.Errorf("the new agent did not start (%q, %v); this one goes on serving", strings.TrimSpace(line), err)
	}
	r.Log.Info("handing over to a new agent", "op", "upgrade", "listeners", strings.Join(names, " "))
	start := time.Now()
	var wg sync.WaitGroup
	var beErr error
	if r.BE != nil {
		wg.Go(func() {
			relayed := r.BE()
			hs := make([]Handed, len(relayed))
			for i := range relayed {
				hs[i] = Handed{Relay: &relayed[i]}
			}
			beErr = out.send(hs)
			r.Log.Info("relayed connections handed over", "op", "upgrade", "sessions", len(hs), "err", beErr)
		})
	}
	var feErr error
	if r.FE != nil {
		heads := r.FE()
		hs := make([]Handed, len(heads))
		for i := range heads {
			hs[i] = Handed{Head: &heads[i]}
		}
		feErr = out.send(hs)
		r.Log.Info("clients still sending their heads handed over", "op", "upgrade", "heads", len(hs), "err", feErr)
	}
	r.Release()
	relErr := out.frame(frame{Kind: KindReleased}, nil)
	wg.Wait()
	doneErr := out.frame(frame{Kind: KindDone}, nil)
	c.Close()
	r.Log.Info("handed over", "op", "upgrade", "took", time.Since(start).Round(time.Millisecond))
	return true, errors.Join(feErr, beErr, relErr, doneErr)
}
