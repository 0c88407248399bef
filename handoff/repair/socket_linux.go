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

// LeavingSocket is a BE's connection moving to another BE: once dumped it
// leaves repair mode (LeaveRepair), so that a crash of this BE while the
// move is in flight closes it with a FIN rather than silently.
type LeavingSocket struct{ Socket }

// Dump dumps the connection and leaves repair mode, still blocked.
func (s LeavingSocket) Dump(consumed []byte) (*wire.ConnInfo, error) {
	ci, err := s.Socket.Dump(consumed)
	if err != nil {
		return nil, err
	}
	if err := LeaveRepair(s.Conn); err != nil {
		return nil, err
	}
	return ci, nil
}

// CloseSilently closes the socket without a packet (see CloseSilently).
func (s LeavingSocket) CloseSilently() error { return CloseSilently(s.Conn) }
