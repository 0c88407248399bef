package transplant

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"
)

// tcpListen is TCP_LISTEN as /proc/net/tcp prints the state ("0A";
// include/net/tcp_states.h).
const tcpListen = 0x0A

// ParseListeners returns the inodes of the listening sockets that take
// connections to addr, from /proc/net/tcp's text (net/ipv4/tcp_ipv4.c,
// get_tcp4_sock: "%4d: %08X:%04X %08X:%04X %02X ... %lu" with the inode
// tenth): those bound to addr and those bound to the wildcard address on
// its port. With nginx's `reuseport` each worker has a listener of its
// own, so there are several; sock_diag's exact lookup finds only one.
// The address is the kernel's __be32 printed as a host-order word.
func ParseListeners(b []byte, addr netip.AddrPort) ([]uint64, error) {
	var out []uint64
	sc := bufio.NewScanner(bytes.NewReader(b))
	first := true
	for sc.Scan() {
		if first { // the header
			first = false
			continue
		}
		f := bytes.Fields(sc.Bytes())
		if len(f) < 10 {
			continue
		}
		st, err := strconv.ParseUint(string(f[3]), 16, 8)
		if err != nil {
			return nil, fmt.Errorf("/proc/net/tcp line %q: state: %w", sc.Bytes(), err)
		}
		if st != tcpListen {
			continue
		}
		local, err := parseHexAddr(f[1])
		if err != nil {
			return nil, fmt.Errorf("/proc/net/tcp line %q: %w", sc.Bytes(), err)
		}
		if local.Port() != addr.Port() || (local.Addr() != addr.Addr() && !local.Addr().IsUnspecified()) {
			continue
		}
		ino, err := strconv.ParseUint(string(f[9]), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("/proc/net/tcp line %q: inode: %w", sc.Bytes(), err)
		}
		out = append(out, ino)
	}
	return out, sc.Err()
}

// parseHexAddr reads "0100007F:0050" (127.0.0.1:80 on a little-endian
// host).
func parseHexAddr(b []byte) (netip.AddrPort, error) {
	a, p, ok := bytes.Cut(b, []byte(":"))
	if !ok || len(a) != 8 {
		return netip.AddrPort{}, fmt.Errorf("address %q: want 8 hex digits:port", b)
	}
	w, err := strconv.ParseUint(string(a), 16, 32)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("address %q: %w", b, err)
	}
	port, err := strconv.ParseUint(string(p), 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port %q: %w", b, err)
	}
	var ip [4]byte
	binary.NativeEndian.PutUint32(ip[:], uint32(w))
	return netip.AddrPortFrom(netip.AddrFrom4(ip), uint16(port)), nil
}
