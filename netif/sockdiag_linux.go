// Package netif holds the kernel calls outside nftables that the agents
// need: socket diagnostics today; VIP addresses and gratuitous ARP live in
// agent/netif.go until they move here.
package netif

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Constants and layouts from include/uapi/linux/sock_diag.h and
// inet_diag.h that x/sys/unix lacks.
const (
	sockDiagByFamily = 20 // SOCK_DIAG_BY_FAMILY
	sockDestroy      = 21 // SOCK_DESTROY

	// sizeof(struct inet_diag_req_v2): family, protocol, ext, pad,
	// states, then struct inet_diag_sockid (sport, dport, src[4], dst[4],
	// if, cookie[2]).
	sizeofInetDiagReqV2 = 56
	// struct inet_diag_msg: family, state, timer, retrans, then the
	// inet_diag_sockid the request had (sport, dport, src[4], dst[4], if,
	// cookie[2]).
	inetDiagMsgStateOff  = 1
	inetDiagMsgIDOff     = 4
	inetDiagMsgCookieOff = inetDiagMsgIDOff + 40
	sizeofInetDiagMsgID  = 48
	// idiag_inode follows the id, idiag_expires, idiag_rqueue,
	// idiag_wqueue and idiag_uid (four __u32).
	inetDiagMsgInodeOff = inetDiagMsgIDOff + sizeofInetDiagMsgID + 16
)

// TCP states (include/net/tcp_states.h).
const (
	TCPEstablished = 1
	TCPTimeWait    = 6
)

// ErrNoSocket is returned when no socket has the 4-tuple.
var ErrNoSocket = errors.New("no such socket")

// inetDiagReq encodes struct inet_diag_req_v2 for one TCP/IPv4 4-tuple,
// in the exact-match form the kernel's inet_diag_find_one_icsk uses; with
// cookie, only the socket that has it matches.
func inetDiagReq(local, remote netip.AddrPort, cookie ...[8]byte) []byte {
	b := make([]byte, sizeofInetDiagReqV2)
	b[0] = unix.AF_INET
	b[1] = unix.IPPROTO_TCP
	binary.NativeEndian.PutUint32(b[4:], 0xffffffff) // every state
	// inet_diag_sockid: ports and addresses in network order.
	binary.BigEndian.PutUint16(b[8:], local.Port())
	binary.BigEndian.PutUint16(b[10:], remote.Port())
	l, r := local.Addr().As4(), remote.Addr().As4()
	copy(b[12:16], l[:])
	copy(b[28:32], r[:])
	// Interface 0; cookie INET_DIAG_NOCOOKIE (any socket) unless given.
	binary.NativeEndian.PutUint32(b[48:], 0xffffffff)
	binary.NativeEndian.PutUint32(b[52:], 0xffffffff)
	if len(cookie) > 0 {
		copy(b[48:56], cookie[0][:])
	}
	return b
}

// request sends one sock_diag request and returns the payload of the
// kernel's one answer (nil for a bare ACK).
func request(msgType uint16, flags uint16, payload []byte) ([]byte, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	hdr := unix.NlMsghdr{
		Len:   uint32(unix.SizeofNlMsghdr + len(payload)),
		Type:  msgType,
		Flags: unix.NLM_F_REQUEST | flags,
		Seq:   1,
	}
	msg := make([]byte, 0, hdr.Len)
	msg = append(msg, (*[unix.SizeofNlMsghdr]byte)(unsafe.Pointer(&hdr))[:]...)
	msg = append(msg, payload...)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("sock_diag send: %w", err)
	}
	buf := make([]byte, 8192)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return nil, fmt.Errorf("sock_diag receive: %w", err)
	}
	// The answer's first message: a header, then its payload.
	if n < unix.SizeofNlMsghdr {
		return nil, fmt.Errorf("sock_diag answer of %d bytes", n)
	}
	l := binary.NativeEndian.Uint32(buf[0:])
	typ := binary.NativeEndian.Uint16(buf[4:])
	if int(l) > n || l < unix.SizeofNlMsghdr {
		return nil, fmt.Errorf("sock_diag answer: length %d of %d bytes", l, n)
	}
	data := buf[unix.SizeofNlMsghdr:l]
	if typ == unix.NLMSG_ERROR {
		if len(data) >= 4 {
			if e := int32(binary.NativeEndian.Uint32(data)); e != 0 {
				errno := unix.Errno(-e)
				if errno == unix.ENOENT {
					return nil, ErrNoSocket
				}
				return nil, errno
			}
		}
		return nil, nil
	}
	return data, nil
}

// Socket is a TCP socket found by its 4-tuple.
type Socket struct {
	State uint8
	// Inode is the socket's inode number, 0 while no file refers to it
	// (an accepted connection the server has not yet accept()ed).
	Inode  uint32
	cookie [8]byte
}

// LookupTCP returns the TCP/IPv4 socket with the 4-tuple local ↔ remote, or
// ErrNoSocket. It asks for that one socket (no NLM_F_DUMP: a dump ignores
// the tuple and lists every socket, which is what vishvananda/netlink's
// SocketGet sends) and checks that the answer is that socket: when the
// tuple has none, the kernel's lookup falls back to a listener on the local
// address.
func LookupTCP(local, remote netip.AddrPort) (Socket, error) {
	req := inetDiagReq(local, remote)
	data, err := request(sockDiagByFamily, 0, req)
	if err != nil {
		return Socket{}, fmt.Errorf("look up %v-%v: %w", local, remote, err)
	}
	if len(data) < inetDiagMsgInodeOff+4 {
		return Socket{}, fmt.Errorf("look up %v-%v: answer of %d bytes", local, remote, len(data))
	}
	// The ports and addresses in the answer must be the request's.
	id := data[inetDiagMsgIDOff:]
	if string(id[0:4]) != string(req[8:12]) || string(id[4:8]) != string(req[12:16]) || string(id[20:24]) != string(req[28:32]) {
		return Socket{}, fmt.Errorf("look up %v-%v: %w", local, remote, ErrNoSocket)
	}
	var s Socket
	s.State = data[inetDiagMsgStateOff]
	s.Inode = binary.NativeEndian.Uint32(data[inetDiagMsgInodeOff:])
	copy(s.cookie[:], data[inetDiagMsgCookieOff:inetDiagMsgCookieOff+8])
	return s, nil
}

// DestroyTCP aborts the socket s found with the 4-tuple (SOCK_DESTROY, what
// `ss -K` does; needs CONFIG_INET_DIAG_DESTROY). The request carries s's
// cookie, so it can hit no other socket.
func DestroyTCP(local, remote netip.AddrPort, s Socket) error {
	if _, err := request(sockDestroy, unix.NLM_F_ACK, inetDiagReq(local, remote, s.cookie)); err != nil {
		return fmt.Errorf("destroy %v-%v: %w", local, remote, err)
	}
	return nil
}
