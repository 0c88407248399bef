package be

import (
	"github.com/prometheus/client_golang/prometheus"

	"tcpha/handoff/wire"
)

// The BE's relay counters, read when scraped (issue 18: a BE exported
// only an empty FE histogram).
var (
	descRelayConns = prometheus.NewDesc("tcpha_relay_connections",
		"BE: handed-off client connections the relay serves.", nil, nil)
	descRelayRequests = prometheus.NewDesc("tcpha_relay_requests_total",
		"BE: requests the relay served (keep-alive ones included).", nil, nil)
	descRelayBytes = prometheus.NewDesc("tcpha_relay_bytes_total",
		"BE: HTTP bytes from clients to web servers (in) and to clients (out).", []string{"direction"}, nil)
	descRelayUpstreamErrors = prometheus.NewDesc("tcpha_relay_upstream_errors_total",
		"BE: requests answered 502 because the web server failed.", nil, nil)
	descRelayMoves = prometheus.NewDesc("tcpha_relay_moves_total",
		"BE: connections moved to another BE (moved), kept although their request was another BE's (not_moved), and moved here straight from another BE (in; a move the FE carried arrives as a handoff).",
		[]string{"result"}, nil)
)

// collector reads the BE's relay for a scrape.
type collector struct{ b *BE }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRelayConns, descRelayRequests, descRelayBytes, descRelayUpstreamErrors, descRelayMoves} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	st := c.b.relay.Stats()
	ch <- prometheus.MustNewConstMetric(descRelayConns, prometheus.GaugeValue, float64(st.Active))
	ch <- prometheus.MustNewConstMetric(descRelayRequests, prometheus.CounterValue, float64(st.Requests))
	ch <- prometheus.MustNewConstMetric(descRelayBytes, prometheus.CounterValue, float64(st.BytesIn), "in")
	ch <- prometheus.MustNewConstMetric(descRelayBytes, prometheus.CounterValue, float64(st.BytesOut), "out")
	ch <- prometheus.MustNewConstMetric(descRelayUpstreamErrors, prometheus.CounterValue, float64(st.BadGateways))
	ch <- prometheus.MustNewConstMetric(descRelayMoves, prometheus.CounterValue, float64(st.Moves), "moved")
	ch <- prometheus.MustNewConstMetric(descRelayMoves, prometheus.CounterValue, float64(st.MoveFailures), "not_moved")
	ch <- prometheus.MustNewConstMetric(descRelayMoves, prometheus.CounterValue, float64(c.b.movesIn.Load()), "in")
}

// relayStats are the relay's counters as the FEs ask for them.
func (b *BE) relayStats() wire.RelayStats {
	st := b.relay.Stats()
	return wire.RelayStats{Requests: uint64(st.Requests), BytesIn: uint64(st.BytesIn), BytesOut: uint64(st.BytesOut),
		UpstreamErrors: uint64(st.BadGateways), MovesOut: uint64(st.Moves), NotMoved: uint64(st.MoveFailures)}
}
