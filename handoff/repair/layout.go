// Package repair moves a live TCP connection between hosts with the kernel's
// TCP_REPAIR interface (linux/net/ipv4/tcp.c, the same calls CRIU's libsoccr
// makes). Dump reads a connected socket's state into a wire.ConnInfo; Restore
// rebuilds an identical socket elsewhere. FACTS.md records the order of the
// calls and what broke when one was missing.
//
// This file holds the byte layouts, which are pure and tested without root.
package repair

import (
	"encoding/binary"
	"errors"
	"fmt"

	"tcpha/handoff/wire"
)

// Constants missing from golang.org/x/sys/unix, named after the kernel's.
const (
	// include/uapi/linux/tcp.h: values of TCP_REPAIR_QUEUE.
	tcpNoQueue   = 0 // TCP_NO_QUEUE
	tcpRecvQueue = 1 // TCP_RECV_QUEUE
	tcpSendQueue = 2 // TCP_SEND_QUEUE

	// include/net/tcp_states.h
	tcpEstablished = 1 // TCP_ESTABLISHED

	// sizeof(struct tcp_repair_window), include/uapi/linux/tcp.h
	sizeofRepairWindow = 20
	// sizeof(struct tcp_repair_opt): __u32 opt_code; __u32 opt_val;
	sizeofRepairOpt = 8
	// The prefix of struct tcp_info we read: up to the wscale byte.
	tcpInfoMinLen = 7
)

// ErrNotEstablished is returned by Dump for a connection that is closing
// or not connected; only ESTABLISHED connections are handed off.
var ErrNotEstablished = errors.New("connection is not ESTABLISHED")

// tcpInfoHead is the part of struct tcp_info (include/uapi/linux/tcp.h) a
// dump needs.
type tcpInfoHead struct {
	State     uint8
	Options   uint8 // TCPI_OPT_* bits, the same values as wire.Opt*
	SndWScale uint8
	RcvWScale uint8
}

// parseTCPInfo decodes the start of a raw struct tcp_info. The window
// scales are the 4-bit fields tcpi_snd_wscale:4, tcpi_rcv_wscale:4 sharing
// byte 6; x/sys/unix's TCPInfo hides that byte in padding (FACTS.md). On
// little-endian machines GCC allocates the first bit-field in the low bits.
func parseTCPInfo(b []byte) (tcpInfoHead, error) {
	if len(b) < tcpInfoMinLen {
		return tcpInfoHead{}, fmt.Errorf("tcp_info: %d bytes, want at least %d", len(b), tcpInfoMinLen)
	}
	return tcpInfoHead{
		State:     b[0],
		Options:   b[5] & (wire.OptTimestamps | wire.OptSACK | wire.OptWScale),
		SndWScale: b[6] & 0x0f,
		RcvWScale: b[6] >> 4,
	}, nil
}

// TCP option codes accepted by TCP_REPAIR_OPTIONS (include/net/tcp.h
// TCPOPT_*; tcp_repair_options_est in net/ipv4/tcp.c).
const (
	tcpoptMSS       = 2
	tcpoptWindow    = 3
	tcpoptSACKPerm  = 4
	tcpoptTimestamp = 8
)

// encodeRepairOptions builds the struct tcp_repair_opt array that restores
// the options negotiated in the handshake the BE never saw. Without window
// scaling downloads stall; without timestamps the client's PAWS check drops
// the BE's segments (FACTS.md).
func encodeRepairOptions(ci *wire.ConnInfo) []byte {
	var b []byte
	put := func(code, val uint32) {
		b = binary.NativeEndian.AppendUint32(b, code)
		b = binary.NativeEndian.AppendUint32(b, val)
	}
	put(tcpoptMSS, uint32(ci.MSS))
	if ci.Options&wire.OptWScale != 0 {
		// tcp_repair_options_est: snd_wscale in the low 16 bits, rcv_wscale in the high.
		put(tcpoptWindow, uint32(ci.SndWScale)|uint32(ci.RcvWScale)<<16)
	}
	if ci.Options&wire.OptSACK != 0 {
		put(tcpoptSACKPerm, 0)
	}
	if ci.Options&wire.OptTimestamps != 0 {
		put(tcpoptTimestamp, 0)
	}
	return b
}

// encodeWindow is struct tcp_repair_window in host byte order.
func encodeWindow(w wire.Window) []byte {
	b := make([]byte, 0, sizeofRepairWindow)
	for _, v := range []uint32{w.SndWl1, w.SndWnd, w.MaxWindow, w.RcvWnd, w.RcvWup} {
		b = binary.NativeEndian.AppendUint32(b, v)
	}
	return b
}

func decodeWindow(b []byte) (wire.Window, error) {
	if len(b) != sizeofRepairWindow {
		return wire.Window{}, fmt.Errorf("tcp_repair_window: %d bytes, want %d", len(b), sizeofRepairWindow)
	}
	u := func(i int) uint32 { return binary.NativeEndian.Uint32(b[4*i:]) }
	return wire.Window{SndWl1: u(0), SndWnd: u(1), MaxWindow: u(2), RcvWnd: u(3), RcvWup: u(4)}, nil
}
