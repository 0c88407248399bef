package repair

import (
	"net"

	"tcpha/handoff/wire"
)

// Socket adapts a live TCP connection to handoff.Socket: the FE's client
// connection before its handoff, a BE's before it moves on.
type Socket struct{ Conn *net.TCPConn }

// Block drops the client's packets to the socket (see Block).
func (s Socket) Block() error { return Block(s.Conn) }

// Dump enters repair mode and returns the connection's state (see Dump).
func (s Socket) Dump(consumed []byte) (*wire.ConnInfo, error) { return Dump(s.Conn, consumed) }

// Resume serves the dumped socket here after all (see Resume).
func (s Socket) Resume() error { return Resume(s.Conn) }

// CloseSilently closes the dumped socket: Dump left it in repair mode, so
// the close sends nothing and leaves no TIME_WAIT.
func (s Socket) CloseSilently() error { return s.Conn.Close() }
