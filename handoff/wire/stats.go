package wire

import (
	"encoding/binary"
	"fmt"
)

// RelayStats is the payload of a StatsReply: a BE's relay counters since
// its agent started, over every FE's connections. The FE turns them into
// each BE's requests and bytes per second (tcphactl rates) and its
// tcpha_backend_*_total metrics.
type RelayStats struct {
	Requests uint64
	// BytesIn are the clients' bytes the relay passed to the web server
	// (request heads and bodies); BytesOut the bytes it sent clients.
	BytesIn, BytesOut uint64
	// UpstreamErrors are the requests answered 502 for the web server.
	UpstreamErrors uint64
	// MovesOut are connections moved to another BE; NotMoved those that
	// stayed although their next request was another BE's.
	MovesOut, NotMoved uint64
}

const relayStatsLen = 6 * 8

// MarshalBinary encodes the counters.
func (s RelayStats) MarshalBinary() ([]byte, error) {
	b := make([]byte, 0, relayStatsLen)
	for _, v := range []uint64{s.Requests, s.BytesIn, s.BytesOut, s.UpstreamErrors, s.MovesOut, s.NotMoved} {
		b = binary.BigEndian.AppendUint64(b, v)
	}
	return b, nil
}

// UnmarshalBinary decodes the counters. Bytes after them are counters a
// newer BE added: ignored, so that an FE keeps reading a newer BE's
// answer during a rolling upgrade.
func (s *RelayStats) UnmarshalBinary(b []byte) error {
	if len(b) < relayStatsLen {
		return fmt.Errorf("%w: %d-byte relay stats", ErrFormat, len(b))
	}
	v := func(i int) uint64 { return binary.BigEndian.Uint64(b[8*i:]) }
	*s = RelayStats{Requests: v(0), BytesIn: v(1), BytesOut: v(2), UpstreamErrors: v(3), MovesOut: v(4), NotMoved: v(5)}
	return nil
}
