package netif

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"unsafe"

	"golang.org/x/sys/unix"
)

// heldStates are the TCP states of a connection a BE still holds: every
// state but TIME_WAIT (the connection is over; a later one on the port
// replaces it), LISTEN, CLOSE and NEW_SYN_RECV (include/net/tcp_states.h:
// ESTABLISHED 1, SYN_SENT 2, SYN_RECV 3, FIN_WAIT1 4, FIN_WAIT2 5,
// CLOSE_WAIT 8, LAST_ACK 9, CLOSING 11). An orphaned FIN_WAIT2 left by a
// dead agent counts: the client's FIN may still have to reach it.
const heldStates = 1<<1 | 1<<2 | 1<<3 | 1<<4 | 1<<5 | 1<<8 | 1<<9 | 1<<11

// nlmFDumpIntr is NLM_F_DUMP_INTR (include/uapi/linux/netlink.h): the
// table changed during the dump, which may have missed entries.
const nlmFDumpIntr = 0x10

// errDumpInterrupted: the kernel flagged a dump as inconsistent.
var errDumpInterrupted = errors.New("sock_diag dump interrupted")

// HeldTCP lists the remote ends of the TCP/IPv4 connections whose local end
// is local, in every state but TIME_WAIT and LISTEN, sorted ascending. A
// dump the kernel flags as interrupted may have missed a connection, and
// the caller ends the forwarding of what is missing: it is retried, and
// after three tries it is an error, never a partial list.
func HeldTCP(local netip.AddrPort) ([]netip.AddrPort, error) {
	for range 3 {
		out, err := dumpTCP(local)
		if errors.Is(err, errDumpInterrupted) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("list connections of %v: %w", local, err)
		}
		slices.SortFunc(out, netip.AddrPort.Compare)
		return slices.Compact(out), nil
	}
	return nil, fmt.Errorf("list connections of %v: %w three times", local, errDumpInterrupted)
}

// heldDumpReq encodes the dump request: struct inet_diag_req_v2 with the
// held states and the local port, which the kernel's inet_diag_dump_icsk
// matches as idiag_sport (the address is checked here).
func heldDumpReq(local netip.AddrPort) []byte {
	b := make([]byte, sizeofInetDiagReqV2)
	b[0] = unix.AF_INET
	b[1] = unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(b[4:], heldStates)
	binary.BigEndian.PutUint16(b[8:], local.Port())
	binary.NativeEndian.PutUint32(b[48:], 0xffffffff)
	binary.NativeEndian.PutUint32(b[52:], 0xffffffff)
	return b
}

func dumpTCP(local netip.AddrPort) ([]netip.AddrPort, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	payload := heldDumpReq(local)
	hdr := unix.NlMsghdr{
		Len:   uint32(unix.SizeofNlMsghdr + len(payload)),
		Type:  sockDiagByFamily,
		Flags: unix.NLM_F_REQUEST | unix.NLM_F_DUMP,
		Seq:   1,
	}
	msg := append((*[unix.SizeofNlMsghdr]byte)(unsafe.Pointer(&hdr))[:], payload...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("sock_diag send: %w", err)
	}
	var out []netip.AddrPort
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return nil, fmt.Errorf("sock_diag receive: %w", err)
		}
		done, err := parseHeldDump(buf[:n], local, &out)
		if err != nil || done {
			return out, err
		}
	}
}

// parseHeldDump adds the remote ends of one datagram of a dump whose local
// end is local to out; done says the dump ended.
func parseHeldDump(b []byte, local netip.AddrPort, out *[]netip.AddrPort) (done bool, err error) {
	want := local.Addr().As4()
	for len(b) >= unix.SizeofNlMsghdr {
		l := binary.NativeEndian.Uint32(b[0:])
		typ := binary.NativeEndian.Uint16(b[4:])
		flags := binary.NativeEndian.Uint16(b[6:])
		if l < unix.SizeofNlMsghdr || int(l) > len(b) {
			return false, fmt.Errorf("sock_diag answer: message of %d bytes in %d", l, len(b))
		}
		data := b[unix.SizeofNlMsghdr:l]
		b = b[min(len(b), nlmAlign(int(l))):]
		if flags&nlmFDumpIntr != 0 {
			return false, errDumpInterrupted
		}
		switch typ {
		case unix.NLMSG_DONE:
			return true, nil
		case unix.NLMSG_ERROR:
			if len(data) >= 4 {
				if e := int32(binary.NativeEndian.Uint32(data)); e != 0 {
					return false, unix.Errno(-e)
				}
			}
			return true, nil
		case sockDiagByFamily:
		default:
			continue
		}
		if len(data) < inetDiagMsgIDOff+sizeofInetDiagMsgID {
			return false, fmt.Errorf("sock_diag answer: socket of %d bytes", len(data))
		}
		if heldStates&(1<<data[inetDiagMsgStateOff]) == 0 {
			continue
		}
		id := data[inetDiagMsgIDOff:]
		// inet_diag_sockid: sport, dport (network order), src[16], dst[16].
		sport := binary.BigEndian.Uint16(id[0:])
		if sport != local.Port() || [4]byte(id[4:8]) != want {
			continue
		}
		*out = append(*out, netip.AddrPortFrom(netip.AddrFrom4([4]byte(id[20:24])), binary.BigEndian.Uint16(id[2:])))
	}
	return false, nil
}

func nlmAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }
