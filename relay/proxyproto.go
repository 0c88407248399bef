package relay

import (
	"encoding/binary"
	"net/netip"
)

// PROXY protocol version 2 (haproxy's doc/proxy-protocol.txt, section
// 2.2): a binary header the web server reads before the connection's own
// bytes, naming the connection's real source and destination.
var proxyV2Signature = [12]byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}

const (
	proxyV2Proxy    = 0x2<<4 | 0x1 // version 2, command PROXY
	proxyV2TCP4     = 0x1<<4 | 0x1 // AF_INET, STREAM
	proxyV2TCP6     = 0x2<<4 | 0x1 // AF_INET6, STREAM
	proxyV2IPv4Addr = 4 + 4 + 2 + 2
	proxyV2IPv6Addr = 16 + 16 + 2 + 2
)

// ProxyHeaderV2 is the PROXY v2 header for a TCP connection from src to
// dst: addresses, then ports, big-endian, no TLVs. Both addresses must be of
// one family (an IPv4-mapped IPv6 address counts as IPv4).
func ProxyHeaderV2(src, dst netip.AddrPort) []byte {
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	fam, n := byte(proxyV2TCP4), proxyV2IPv4Addr
	if s.Is6() || d.Is6() {
		fam, n = proxyV2TCP6, proxyV2IPv6Addr
		s, d = netip.AddrFrom16(s.As16()), netip.AddrFrom16(d.As16())
	}
	b := make([]byte, 0, 16+n)
	b = append(b, proxyV2Signature[:]...)
	b = append(b, proxyV2Proxy, fam)
	b = binary.BigEndian.AppendUint16(b, uint16(n))
	b = append(b, s.AsSlice()...)
	b = append(b, d.AsSlice()...)
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}
