package nft

import (
	"math/bits"
	"net/netip"
)

// SlotOf is the slot the FE's packet path gives flow with `accept = be`:
// the kernel's `jhash ip saddr . tcp sport mod modulus seed seed`
// (net/netfilter/nft_hash.c: reciprocal_scale(jhash(reg, 8, seed),
// modulus)) over the two key registers, the port zero-padded to 4 bytes.
// It lets the agent and tcphactl name the BE a flow was placed on without
// asking the kernel; the namespace test checks it against the kernel.
func SlotOf(flow netip.AddrPort, modulus, seed uint32) uint32 {
	return uint32(uint64(jhash(Key(flow), seed)) * uint64(modulus) >> 32)
}

// jhash is include/linux/jhash.h's jhash (Bob Jenkins' lookup3) for keys of
// at most 12 bytes, which is all the FE hashes.
func jhash(k []byte, initval uint32) uint32 {
	const jhashInitval = 0xdeadbeef
	a := jhashInitval + uint32(len(k)) + initval
	b, c := a, a
	word := func(off int) uint32 {
		var w uint32
		for i := 3; i >= 0; i-- {
			if off+i < len(k) {
				w = w<<8 | uint32(k[off+i])
			} else {
				w <<= 8
			}
		}
		return w
	}
	if len(k) == 0 {
		return c
	}
	a += word(0)
	b += word(4)
	c += word(8)
	// __jhash_final
	c ^= b
	c -= bits.RotateLeft32(b, 14)
	a ^= c
	a -= bits.RotateLeft32(c, 11)
	b ^= a
	b -= bits.RotateLeft32(a, 25)
	c ^= b
	c -= bits.RotateLeft32(b, 16)
	a ^= c
	a -= bits.RotateLeft32(c, 4)
	b ^= a
	b -= bits.RotateLeft32(a, 14)
	c ^= b
	c -= bits.RotateLeft32(b, 24)
	return c
}
