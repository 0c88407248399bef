package handoff

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"tcpha/backends"
	"tcpha/handoff/wire"
)

// Client offers connections to BEs over pooled control connections.
type Client struct {
	Pool  *backends.Pool
	Codec wire.Codec
}

// Offer implements Peer.
func (c *Client) Offer(ctx context.Context, be netip.AddrPort, ci *wire.ConnInfo) (Offer, error) {
	payload, err := ci.MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("offer %v: %w", be, err)
	}
	magic := ci.ConnMagic()
	// A pooled connection may have been closed by the BE while idle (its
	// agent restarted); that is only known when it fails, so a failure on a
	// reused connection is retried once on a fresh one.
	for {
		cc, err := c.Pool.Get(ctx, be)
		if err != nil {
			return nil, fmt.Errorf("offer to %v: connect: %w", be, err)
		}
		o, retry, err := c.offer(ctx, cc, payload, magic)
		if err == nil {
			return o, nil
		}
		var refused *RefusedError
		if errors.As(err, &refused) {
			c.Pool.Put(cc)
			return nil, err
		}
		c.Pool.Discard(cc)
		if !retry || ctx.Err() != nil {
			return nil, err
		}
	}
}

func (c *Client) offer(ctx context.Context, cc *backends.Conn, payload []byte, magic uint32) (Offer, bool, error) {
	if d, ok := ctx.Deadline(); ok {
		cc.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { cc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := c.Codec.Write(cc, wire.Frame{Type: wire.TypeRequest, ConnMagic: magic, Payload: payload}); err != nil {
		return nil, cc.Reused, fmt.Errorf("offer to %v: send request: %w", cc.BE, err)
	}
	f, err := c.Codec.Read(cc)
	if err != nil {
		return nil, cc.Reused && !isTimeout(err), fmt.Errorf("offer to %v: read ACK: %w", cc.BE, err)
	}
	if f.Type != wire.TypeAck || f.ConnMagic != magic {
		return nil, false, fmt.Errorf("offer to %v: got %v for conn_magic %d, want ack for %d", cc.BE, f.Type, f.ConnMagic, magic)
	}
	var ack wire.Ack
	if err := ack.UnmarshalBinary(f.Payload); err != nil {
		return nil, false, fmt.Errorf("offer to %v: %w", cc.BE, err)
	}
	if ack.Result != wire.ResultOK {
		cc.SetDeadline(time.Time{})
		return nil, false, &RefusedError{BE: cc.BE, Ack: ack}
	}
	cc.SetDeadline(time.Time{})
	return &offer{c: c, cc: cc, magic: magic}, false, nil
}

func isTimeout(err error) bool {
	var t interface{ Timeout() bool }
	return errors.As(err, &t) && t.Timeout()
}

type offer struct {
	c     *Client
	cc    *backends.Conn
	magic uint32
}

func (o *offer) send(t wire.Type) error {
	o.cc.SetWriteDeadline(time.Now().Add(time.Second))
	err := o.c.Codec.Write(o.cc, wire.Frame{Type: t, ConnMagic: o.magic})
	o.cc.SetWriteDeadline(time.Time{})
	if err != nil {
		o.c.Pool.Discard(o.cc)
		return fmt.Errorf("send %v to %v: %w", t, o.cc.BE, err)
	}
	o.c.Pool.Put(o.cc)
	return nil
}

func (o *offer) Commit() error { return o.send(wire.TypeCommit) }
func (o *offer) Abort()        { o.send(wire.TypeAbort) }

// Ping asks be whether it is alive (seed 4.9 detection), on a pooled
// control connection. Like Offer, it retries once when a reused connection
// turns out to be dead.
func (c *Client) Ping(ctx context.Context, be netip.AddrPort) error {
	for {
		cc, err := c.Pool.Get(ctx, be)
		if err != nil {
			return fmt.Errorf("ping %v: %w", be, err)
		}
		if d, ok := ctx.Deadline(); ok {
			cc.SetDeadline(d)
		}
		err = c.Codec.Write(cc, wire.Frame{Type: wire.TypePing})
		var f wire.Frame
		if err == nil {
			f, err = c.Codec.Read(cc)
		}
		if err == nil && f.Type != wire.TypePong {
			err = fmt.Errorf("got %v, want pong", f.Type)
		}
		if err == nil {
			cc.SetDeadline(time.Time{})
			c.Pool.Put(cc)
			return nil
		}
		c.Pool.Discard(cc)
		if !cc.Reused || ctx.Err() != nil {
			return fmt.Errorf("ping %v: %w", be, err)
		}
	}
}
