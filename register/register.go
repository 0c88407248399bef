// Package register is the seed's dynamic registration (4.10): a BE with
// `dregister = 1` joins an FE's scheduling at run time with its own rules,
// over an authenticated control session that it keeps open; the FE adds it
// like a configured BE and removes it when it deregisters or its session
// ends. Registration needs the cluster secret: a registration is a claim
// to serve the cluster's clients.
package register

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"

	"tcpha/backends"
	"tcpha/handoff/ctl"
	"tcpha/handoff/wire"
)

// Server is the FE's side: the handler of the sessions BEs open to its
// registration port.
type Server struct {
	// VIP is the FE's VIP: a BE must serve the same.
	VIP netip.Addr
	// Add puts a registered BE into scheduling (and dials its control
	// port); Remove takes it out.
	Add    func(backends.Registration) error
	Remove func(netip.Addr)
	Log    *slog.Logger
	// Grace is how long a registration outlives its session (0: the
	// default).
	Grace time.Duration

	mu     sync.Mutex
	owners map[netip.Addr]*ctl.Session
}

// Admit takes sessions only from BEs of this VIP that say who they are.
func (sv *Server) Admit(remote net.Addr, h wire.Hello) error {
	src, _ := netip.ParseAddrPort(remote.String())
	switch {
	case h.Role != wire.RoleBE:
		return fmt.Errorf("a %v cannot register", h.Role)
	case h.Addr.Addr() != src.Addr().Unmap():
		return fmt.Errorf("hello claims %v but comes from %v", h.Addr.Addr(), src.Addr())
	case h.Addr.Port() == 0:
		return errors.New("the BE names no control port")
	case h.VIP.Addr() != sv.VIP:
		return fmt.Errorf("the BE serves VIP %v, this FE %v", h.VIP.Addr(), sv.VIP)
	}
	return nil
}

// Serve implements ctl.Handler.
func (sv *Server) Serve(s *ctl.Session, f wire.Frame) {
	be := s.Peer.Addr
	log := sv.Log.With("be", be.String())
	switch f.Type {
	case wire.TypeRegister:
		reg, err := decode(be, f.Payload)
		if err == nil {
			err = sv.Add(reg)
		}
		if err != nil {
			log.Warn("registration refused", "op", "register", "err", err)
			s.Reply(f, ctl.AckFrame(wire.ResultInvalid, err.Error()))
			return
		}
		sv.mu.Lock()
		if sv.owners == nil {
			sv.owners = map[netip.Addr]*ctl.Session{}
		}
		sv.owners[be.Addr()] = s
		sv.mu.Unlock()
		// The registration lasts as long as the session that made it, and a
		// little more: a BE that dies is taken out (its handoff sessions
		// are gone already, so it was not scheduled meanwhile); one that is
		// upgraded registers again from its successor first.
		go func() {
			<-s.Done()
			time.AfterFunc(cmp.Or(sv.Grace, DefaultGrace), func() { sv.leave(s, be.Addr(), "its registration session ended") })
		}()
		log.Info("BE registered", "op", "register", "rules", len(reg.Rules), "weight", reg.Server.Weight)
		s.Reply(f, ctl.AckFrame(wire.ResultOK, ""))
	case wire.TypeDeregister:
		sv.leave(s, be.Addr(), "it deregistered")
		s.Reply(f, ctl.AckFrame(wire.ResultOK, ""))
	default:
		s.Reply(f, ctl.AckFrame(wire.ResultInvalid, "unexpected "+f.Type.String()))
	}
}

// Adopt takes a registration a predecessor agent held (an upgrade): the
// caller has scheduled it already. The BE registers again with this agent
// once its session to the old one ends; if it has not within the grace,
// it is taken out.
func (sv *Server) Adopt(be netip.Addr) {
	time.AfterFunc(2*cmp.Or(sv.Grace, DefaultGrace), func() {
		sv.mu.Lock()
		_, owned := sv.owners[be]
		sv.mu.Unlock()
		if !owned {
			sv.Log.Info("BE deregistered", "op", "register", "be", be.String(),
				"why", "it did not register again after the upgrade")
			sv.Remove(be)
		}
	})
}

// leave removes be if s is the session that registered it last.
func (sv *Server) leave(s *ctl.Session, be netip.Addr, why string) {
	sv.mu.Lock()
	owner := sv.owners[be] == s
	if owner {
		delete(sv.owners, be)
	}
	sv.mu.Unlock()
	if owner {
		sv.Remove(be)
		sv.Log.Info("BE deregistered", "op", "register", "be", be.String(), "why", why)
	}
}

// DefaultGrace is how long a registration outlives the session that made
// it, unless Server.Grace says otherwise.
const DefaultGrace = 3 * time.Second

// decode turns a Register payload from be into a registration.
func decode(be netip.AddrPort, p []byte) (backends.Registration, error) {
	var r wire.Register
	if err := r.UnmarshalBinary(p); err != nil {
		return backends.Registration{}, err
	}
	return backends.Registered(be, int(r.Weight), r.Patterns)
}

// Client is the BE's side: it registers with each of its FEs and keeps
// the registration's session open, registering again after it ends.
type Client struct {
	Config *ctl.Config // Local is the BE's Hello: its address, control port, VIP
	Dial   ctl.DialFunc
	FEs    []netip.AddrPort // each FE's raddr:feport
	Weight int
	Rules  []backends.Rule
	Log    *slog.Logger
}

// Run registers with every FE until ctx ends; then it deregisters, unless
// stay says the BE is being handed to a successor that registers itself.
func (c *Client) Run(ctx context.Context, stay func() bool) {
	var wg sync.WaitGroup
	for _, fe := range c.FEs {
		wg.Go(func() { c.keep(ctx, fe, stay) })
	}
	wg.Wait()
}

func (c *Client) payload() []byte {
	r := wire.Register{Weight: uint16(c.Weight)}
	for _, x := range c.Rules {
		r.Patterns = append(r.Patterns, x.Pattern.String())
	}
	b, _ := r.MarshalBinary()
	return b
}

func (c *Client) keep(ctx context.Context, fe netip.AddrPort, stay func() bool) {
	log := c.Log.With("fe", fe.String())
	backoff := 100 * time.Millisecond
	lastErr := ""
	for ctx.Err() == nil {
		s, err := c.register(ctx, fe)
		if err != nil {
			if err.Error() != lastErr {
				log.Warn("registration failed", "op", "register", "err", err)
				lastErr = err.Error()
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff/2 + rand.N(backoff/2+1)):
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		log.Info("registered", "op", "register")
		backoff, lastErr = 100*time.Millisecond, ""
		select {
		case <-s.Done():
			log.Warn("registration session ended; registering again", "op", "register", "err", s.Err())
		case <-ctx.Done():
			if stay == nil || !stay() {
				dctx, cancel := context.WithTimeout(context.Background(), time.Second)
				_, err := s.Call(dctx, wire.Frame{Type: wire.TypeDeregister})
				cancel()
				if err != nil {
					log.Warn("deregistration not confirmed", "op", "register", "err", err)
				} else {
					log.Info("deregistered", "op", "register")
				}
			}
			s.Close()
			return
		}
	}
}

func (c *Client) register(ctx context.Context, fe netip.AddrPort) (*ctl.Session, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := c.Dial(dctx, fe)
	if err != nil {
		return nil, err
	}
	s, err := ctl.Dial(conn, c.Config)
	if err != nil {
		return nil, err
	}
	r, err := s.Call(dctx, wire.Frame{Type: wire.TypeRegister, Payload: c.payload()})
	if err == nil && r.Type != wire.TypeAck {
		err = fmt.Errorf("got %s, want ack", r.Type)
	}
	if err == nil {
		var a wire.Ack
		if err = a.UnmarshalBinary(r.Payload); err == nil && a.Result != wire.ResultOK {
			err = fmt.Errorf("the FE refused: %s", a.Reason)
		}
	}
	if err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}
