package tests

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"sort"
)

// segment is one TCP segment from a capture.
type segment struct {
	src, dst netip.AddrPort
	seq      uint32
	syn      bool
	payload  []byte
}

// readPcap reads the IPv4/TCP segments of a classic pcap file of Ethernet
// frames (tcpdump -w).
func readPcap(path string) ([]segment, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) < 24 {
		return nil, fmt.Errorf("%s: %d bytes, no pcap header", path, len(b))
	}
	var bo binary.ByteOrder
	switch binary.LittleEndian.Uint32(b) {
	case 0xa1b2c3d4, 0xa1b23c4d:
		bo = binary.LittleEndian
	case 0xd4c3b2a1, 0x4d3cb2a1:
		bo = binary.BigEndian
	default:
		return nil, fmt.Errorf("%s: not a pcap file", path)
	}
	if lt := bo.Uint32(b[20:]); lt != 1 {
		return nil, fmt.Errorf("%s: link type %d, want Ethernet", path, lt)
	}
	var out []segment
	for p := b[24:]; len(p) >= 16; {
		n := int(bo.Uint32(p[8:]))
		if len(p) < 16+n {
			break
		}
		frame := p[16 : 16+n]
		p = p[16+n:]
		if len(frame) < 14+20 || binary.BigEndian.Uint16(frame[12:]) != 0x0800 {
			continue
		}
		ip := frame[14:]
		ihl := int(ip[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(ip[2:]))
		if ip[9] != 6 || total > len(ip) || ihl+20 > total {
			continue
		}
		tcp := ip[ihl:total]
		off := int(tcp[12]>>4) * 4
		if off > len(tcp) {
			continue
		}
		out = append(out, segment{
			src:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[12:16])), binary.BigEndian.Uint16(tcp[0:])),
			dst:     netip.AddrPortFrom(netip.AddrFrom4([4]byte(ip[16:20])), binary.BigEndian.Uint16(tcp[2:])),
			seq:     binary.BigEndian.Uint32(tcp[4:]),
			syn:     tcp[13]&0x02 != 0,
			payload: tcp[off:],
		})
	}
	return out, nil
}

// streamFrom reassembles, in sequence order without duplicates, the bytes
// sent from src in the connection that src opened (its SYN is in the
// capture); it returns the longest such stream to dst.
func streamFrom(segs []segment, src netip.Addr, dst netip.AddrPort) []byte {
	type stream struct {
		isn   uint32
		parts map[uint32][]byte
	}
	streams := map[netip.AddrPort]*stream{}
	for _, s := range segs {
		if s.src.Addr() != src || s.dst != dst {
			continue
		}
		st := streams[s.src]
		if s.syn {
			st = &stream{isn: s.seq + 1, parts: map[uint32][]byte{}}
			streams[s.src] = st
			continue
		}
		if st != nil && len(s.payload) > 0 {
			st.parts[s.seq-st.isn] = s.payload
		}
	}
	var best []byte
	for _, st := range streams {
		offs := make([]uint32, 0, len(st.parts))
		for o := range st.parts {
			offs = append(offs, o)
		}
		sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
		var b []byte
		for _, o := range offs {
			if int(o) > len(b) {
				break // a gap: the capture missed a segment
			}
			if end := int(o) + len(st.parts[o]); end > len(b) {
				b = append(b, st.parts[o][len(b)-int(o):]...)
			}
		}
		if len(b) > len(best) {
			best = b
		}
	}
	return best
}
