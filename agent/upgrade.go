package agent

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
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

// An upgrade hands a running agent's sockets to its successor over the
// admin socket, as HAProxy's `expose-fd listeners` does. The successor
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
// first byte. A predecessor that dies midway releases by dying.

// handoverFrame is one message of the upgrade.
type handoverFrame struct {
	Kind string `json:"kind"` // start, sessions, released, done, refused
	// start: which listeners the descriptors are, in order, and the FE's
	// registered BEs.
	Listeners  []string             `json:"listeners,omitempty"`
	Registered []handedRegistration `json:"registered,omitempty"`
	// sessions: each takes one descriptor (the client), or two when
	// Upstream is set.
	Sessions []handedSession `json:"sessions,omitempty"`
	// refused: why.
	Reason string `json:"reason,omitempty"`
}

// handedRegistration is a BE registered with the FE (seed 4.10): the
// successor schedules it until the BE registers again with it.
type handedRegistration struct {
	BE       netip.AddrPort `json:"be"`
	Weight   int            `json:"weight"`
	Patterns []string       `json:"patterns"`
}

type handedSession struct {
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
func sendFrame(c *net.UnixConn, f handoverFrame, files []*os.File) error {
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
func recvFrame(c *net.UnixConn) (handoverFrame, []*os.File, error) {
	var f handoverFrame
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
	Registered             []backends.Registration
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
	if f.Kind == "refused" {
		uc.Close()
		return nil, fmt.Errorf("admin socket %s: %w (%s)", adminPath, admin.ErrAgentRunning, f.Reason)
	}
	if f.Kind != "start" || len(f.Listeners) != len(files) {
		uc.Close()
		return nil, fmt.Errorf("admin socket %s: got %q with %d descriptors, want start with %d", adminPath, f.Kind, len(files), len(f.Listeners))
	}
	in := &Inherited{conn: uc}
	for _, hr := range f.Registered {
		reg := backends.Registration{Server: backends.Server{Addr: hr.BE.Addr(), Port: hr.BE.Port(), Weight: hr.Weight}}
		for _, pat := range hr.Patterns {
			re, err := regexp.Compile(pat)
			if err != nil {
				continue // the predecessor compiled it: not expected
			}
			reg.Rules = append(reg.Rules, backends.Rule{Targets: []netip.Addr{hr.BE.Addr()}, Pattern: re})
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
		case "vip":
			in.VIP = ln
		case "control":
			in.Control = ln
		case "register":
			in.Register = ln
		default:
			ln.Close()
		}
	}
	return in, nil
}

// handed is one connection a predecessor handed over: an FE client still
// sending its head, or a BE's relayed session.
type handed struct {
	head  *frontend.HandedHead
	relay *relay.Handed
}

func (h handed) close() {
	if h.head != nil {
		h.head.Conn.Close()
	}
	if h.relay != nil {
		h.relay.Client.Close()
		if h.relay.Upstream != nil {
			h.relay.Upstream.Close()
		}
	}
}

// Receive passes each handed connection to take, and calls released when
// the predecessor has let go of what only one agent may hold, until it is
// done (or gone: a predecessor that dies midway releases by dying, and
// released is then called on its way out).
func (in *Inherited) Receive(take func(handed), released func()) error {
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
		case "released":
			closeAll(files)
			release()
		case "done":
			closeAll(files)
			return nil
		case "sessions":
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
				var h handed
				client := next()
				switch {
				case client == nil:
					continue
				case s.IsHead:
					h.head = &frontend.HandedHead{Conn: client, Read: s.Head, Deadline: s.Deadline}
				default:
					h.relay = &relay.Handed{Client: client, State: s.State}
					if s.Upstream {
						if h.relay.Upstream = next(); h.relay.Upstream == nil {
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
			return fmt.Errorf("upgrade: unexpected %q frame", f.Kind)
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
	in.closeListeners()
	in.conn.Close()
}

// closeListeners closes the listeners no role took.
func (in *Inherited) closeListeners() {
	if in.VIP != nil {
		in.VIP.Close()
		in.VIP = nil
	}
	if in.Control != nil {
		in.Control.Close()
		in.Control = nil
	}
	if in.Register != nil {
		in.Register.Close()
		in.Register = nil
	}
}

// sender writes frames to a successor from more than one goroutine.
type sender struct {
	mu sync.Mutex
	c  *net.UnixConn
}

func (s *sender) frame(f handoverFrame, files []*os.File) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return sendFrame(s.c, f, files)
}

// send passes handed connections to the successor, 100 a frame, and closes
// this process's copies.
func (s *sender) send(hs []handed) error {
	for start := 0; start < len(hs); start += sessionsPerFrame {
		batch := hs[start:min(start+sessionsPerFrame, len(hs))]
		f := handoverFrame{Kind: "sessions"}
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
			case h.head != nil:
				f.Sessions = append(f.Sessions, handedSession{IsHead: true, Head: h.head.Read, Deadline: h.head.Deadline})
				err = add(h.head.Conn)
			default:
				f.Sessions = append(f.Sessions, handedSession{Upstream: h.relay.Upstream != nil, State: h.relay.State})
				if err = add(h.relay.Client); err == nil && h.relay.Upstream != nil {
					err = add(h.relay.Upstream)
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
			h.close()
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// handOver gives this agent's sockets to the successor on c and lets go of
// what only one agent may hold. An error before the listeners went leaves
// the agent serving as before; after, the agent is past the point of no
// return and r.admin is nil.
func (r *runner) handOver(c *net.UnixConn, stopServe func()) error {
	out := &sender{c: c}
	var names []string
	var files []*os.File
	for _, l := range []struct {
		name string
		ln   net.Listener
	}{{"vip", r.feListener()}, {"register", r.regListener()}, {"control", r.beListener()}} {
		if l.ln == nil {
			continue
		}
		f, err := l.ln.(*net.TCPListener).File()
		if err != nil {
			closeAll(files)
			return fmt.Errorf("upgrade: the %s listener: %w", l.name, err)
		}
		names, files = append(names, l.name), append(files, f)
	}
	first := handoverFrame{Kind: "start", Listeners: names}
	if r.f != nil {
		for _, reg := range r.f.sched.Registrations() {
			hr := handedRegistration{BE: reg.Server.AddrPort(), Weight: reg.Server.Weight}
			for _, x := range reg.Rules {
				hr.Patterns = append(hr.Patterns, x.Pattern.String())
			}
			first.Registered = append(first.Registered, hr)
		}
	}
	err := out.frame(first, files)
	closeAll(files)
	if err != nil {
		return err
	}
	// Nothing stops here before the new agent says it started: one that
	// fails (a bad config, a missing capability) leaves this one serving.
	c.SetReadDeadline(time.Now().Add(startWait))
	line, err := bufio.NewReader(c).ReadString('\n')
	c.SetReadDeadline(time.Time{})
	if err != nil || strings.TrimSpace(line) != "go" {
		return fmt.Errorf("the new agent did not start (%q, %v); this one goes on serving", strings.TrimSpace(line), err)
	}
	r.log.Info("handing over to a new agent", "op", "upgrade", "listeners", strings.Join(names, " "))
	start := time.Now()
	var wg sync.WaitGroup
	var beErr error
	if r.b != nil {
		wg.Go(func() {
			hs := r.b.handOver()
			beErr = out.send(hs)
			r.log.Info("relayed connections handed over", "op", "upgrade", "sessions", len(hs), "err", beErr)
		})
	}
	var feErr error
	if r.f != nil {
		hs := r.f.handOver(stopServe)
		feErr = out.send(hs)
		r.log.Info("clients still sending their heads handed over", "op", "upgrade", "heads", len(hs), "err", feErr)
	} else {
		stopServe()
	}
	r.releaseAll()
	relErr := out.frame(handoverFrame{Kind: "released"}, nil)
	wg.Wait()
	doneErr := out.frame(handoverFrame{Kind: "done"}, nil)
	c.Close()
	r.log.Info("handed over", "op", "upgrade", "took", time.Since(start).Round(time.Millisecond))
	return errors.Join(feErr, beErr, relErr, doneErr)
}

func (r *runner) feListener() net.Listener {
	if r.f == nil {
		return nil
	}
	return r.f.ln
}

func (r *runner) regListener() net.Listener {
	if r.f == nil || r.f.regLn == nil {
		return nil
	}
	return r.f.regLn
}

func (r *runner) beListener() net.Listener {
	if r.b == nil {
		return nil
	}
	return r.b.ln
}
