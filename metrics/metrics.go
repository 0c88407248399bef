// Package metrics holds the agent's counters as Prometheus collectors
// (prometheus/client_golang) on a registry of its own, and serves them with
// the Go runtime's profiles on the configured local addresses.
package metrics

import (
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"tcpha/internal/version"
)

// Metrics are one agent's collectors.
type Metrics struct {
	Registry *prometheus.Registry

	// Handoffs counts the FE's handoffs by result: ok, no-be (every
	// candidate refused or was unreachable), table-full (the flow table was
	// at its capacity), error (the connection was not usable), local, 503,
	// and 400, 408, 431 (a request head the FE could not read).
	Handoffs *prometheus.CounterVec
	// HandoffDuration is the FE's time from the start of a handoff (block)
	// to the commit sent, for handoffs that succeeded.
	HandoffDuration prometheus.Histogram
	// Offers counts the offers a BE answered, by result (ok, busy, ...).
	Offers *prometheus.CounterVec
	// Probes counts the FE's health probes, by BE and result (ok,
	// failed).
	Probes *prometheus.CounterVec
	// Migrations counts the connections BEs gave back to the FE to move
	// (phttp = multi), by the FE's answer (ok, stay, unknown-flow, ...).
	Migrations *prometheus.CounterVec
	// TLSRefused counts the connections on the VIP's TLS port whose first
	// bytes were no usable ClientHello, by reason (tlshello.Reason's
	// labels: timeout, http, garbage, sslv2, oversized, ...).
	TLSRefused *prometheus.CounterVec
	// TableReinstalls counts the times a role found its nftables table
	// gone or changed (`nft flush ruleset`) and put it back, by family.
	TableReinstalls *prometheus.CounterVec
	// Reloads counts the reloads (SIGHUP, tcphactl reload) by result: ok,
	// or refused (the file did not load; the running config stays).
	Reloads *prometheus.CounterVec
	// LastReloadOK is 1 when the last reload (or the start) loaded the
	// config, 0 when it was refused; LastReload is its time. Together, like
	// Prometheus's own prometheus_config_last_reload_*, they let an alert
	// say "the file on disk is not the one running" and since when.
	LastReloadOK prometheus.Gauge
	LastReload   prometheus.Gauge
	// Deliveries counts, with [be] deliver = socket, the connections the
	// BE handed to its web server's own socket (result delivered) or
	// relayed instead, by the reason (phttp, not_accepted, worker_gone,
	// ...).
	Deliveries *prometheus.CounterVec
	// BHPackets counts, on a BE with deliver = socket, the delivered
	// connections' packets its NFQUEUE judged, by reason (here,
	// willhandoff, head-split, stayed, ...).
	BHPackets *prometheus.CounterVec
}

// HandoffBuckets cover 50 µs to about 6 s in steps of 1.5×, fine enough to
// read a p50 of a few hundred microseconds and a p99 of milliseconds.
var HandoffBuckets = prometheus.ExponentialBuckets(50e-6, 1.5, 30)

// New returns the collectors, registered with the Go runtime's and the
// process's own.
func New() *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{
		Registry: r,
		Handoffs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcpha_handoffs_total", Help: "Client connections the FE finished with, by result.",
		}, []string{"result"}),
		HandoffDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tcpha_handoff_duration_seconds",
			Help:    "FE: from blocking the client's connection to the commit, for handoffs that succeeded.",
			Buckets: HandoffBuckets,
		}),
		Offers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcpha_offers_total", Help: "BE: offers answered, by result.",
		}, []string{"result"}),
		Probes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcpha_probes_total", Help: "FE: health probes of BEs, by BE and result.",
		}, []string{"backend", "result"}),
		Migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcpha_migrations_total", Help: "FE: connections a BE asked to move to another BE, by result.",
		}, []string{"result"}),
		TLSRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcpha_tls_refused_total", Help: "FE: connections to the TLS port refused before a handoff, by reason.",
		}, []string{"reason"}),
		TableReinstalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcpha_table_reinstalls_total", Help: "Times the agent found its nftables table gone or changed and reinstalled it, by family.",
		}, []string{"family"}),
		Reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcpha_config_reloads_total", Help: "Reloads of the config file, by result (ok, refused).",
		}, []string{"result"}),
		LastReloadOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tcpha_config_last_reload_successful", Help: "1 if the last reload (or the start) loaded the config file, 0 if it was refused.",
		}),
		LastReload: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tcpha_config_last_reload_timestamp_seconds", Help: "Unix time of the last reload, refused or not, or of the start.",
		}),
		Deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcpha_deliveries_total", Help: "BE, deliver = socket: connections, HTTP and TLS, handed to the web server's own socket (delivered) or relayed, by the fallback's reason.",
		}, []string{"result"}),
		BHPackets: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tcpha_be_nfqueue_packets_total", Help: "BE, deliver = socket: packets of delivered connections judged from NFQUEUE, by reason.",
		}, []string{"reason"}),
	}
	// Both results exist from the start, so that a rate() or an alert on
	// refused sees 0 rather than no series.
	m.Reloads.WithLabelValues("ok")
	m.Reloads.WithLabelValues("refused")
	m.LastReloadOK.Set(1)
	m.LastReload.Set(float64(time.Now().UnixNano()) / 1e9)
	buildInfo := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "tcpha_build_info", Help: "Always 1; the labels say which tcpha is running.",
		ConstLabels: prometheus.Labels{"version": version.Number(), "goversion": runtime.Version()},
	})
	buildInfo.Set(1)
	// HandoffDuration is registered by the FE role (fe.Start): a BE
	// exported it empty.
	r.MustRegister(m.Handoffs, m.Offers, m.Probes, m.Migrations, m.TLSRefused, m.TableReinstalls, m.Deliveries, m.BHPackets,
		m.Reloads, m.LastReloadOK, m.LastReload, buildInfo,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ObserveReload records a reload at t: ok, or refused.
func (m *Metrics) ObserveReload(ok bool, t time.Time) {
	result, v := "refused", 0.0
	if ok {
		result, v = "ok", 1
	}
	m.Reloads.WithLabelValues(result).Inc()
	m.LastReloadOK.Set(v)
	m.LastReload.Set(float64(t.UnixNano()) / 1e9)
}

// ObserveHandoff records a successful handoff that took d.
func (m *Metrics) ObserveHandoff(d time.Duration) {
	m.Handoffs.WithLabelValues("ok").Inc()
	m.HandoffDuration.Observe(d.Seconds())
}
