package fe

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"tcpha/handoff/conntab"
)

// The FE's gauges and the kernel's counters, read when scraped.
var (
	descConns = prometheus.NewDesc("tcpha_connections",
		"FE: client connections in the connection table, by state.", []string{"state"}, nil)
	descUp = prometheus.NewDesc("tcpha_backend_up",
		"FE: 1 when the BE is available (control sessions up, probes good).", []string{"backend"}, nil)
	descActive = prometheus.NewDesc("tcpha_backend_active_connections",
		"FE: the connections the BE serves, by its last probe.", []string{"backend"}, nil)
	descLive = prometheus.NewDesc("tcpha_backend_live_connections",
		"FE: the connections this FE handed to the BE that are still open.", []string{"backend"}, nil)
	descWeight = prometheus.NewDesc("tcpha_backend_weight",
		"FE: the BE's weight.", []string{"backend"}, nil)
	descBEHandoffs = prometheus.NewDesc("tcpha_backend_handoffs_total",
		"FE: handoffs the BE took.", []string{"backend"}, nil)
	descBEFailures = prometheus.NewDesc("tcpha_backend_failures_total",
		"FE: handoffs the BE refused or failed.", []string{"backend"}, nil)
	descBERequests = prometheus.NewDesc("tcpha_backend_requests_total",
		"FE: requests the BE's relay served, over every FE, as the BE last reported them.", []string{"backend"}, nil)
	descBEBytes = prometheus.NewDesc("tcpha_backend_bytes_total",
		"FE: HTTP bytes the BE's relay passed from clients (in) and sent them (out), over every FE, as the BE last reported them.",
		[]string{"backend", "direction"}, nil)
	descFwdPackets = prometheus.NewDesc("tcpha_forwarded_packets_total",
		"FE: client packets forwarded to BEs in the kernel.", nil, nil)
	descFwdBytes = prometheus.NewDesc("tcpha_forwarded_bytes_total",
		"FE: bytes of client packets forwarded to BEs in the kernel.", nil, nil)
	descQueued = prometheus.NewDesc("tcpha_nfqueue_packets_total",
		"FE: packets the kernel queued to the agent, each once: by the event it carried (none if it reached no connection) and the reason for its verdict.",
		[]string{"event", "reason"}, nil)
	descQueueDrops = prometheus.NewDesc("tcpha_nfqueue_dropped_total",
		"FE: packets the queue dropped: queue full (queue) or not delivered to the agent (user).", []string{"reason"}, nil)
)

// collector reads the FE's state for a scrape.
type collector struct{ f *FE }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConns, descUp, descActive, descLive, descWeight, descBEHandoffs,
		descBEFailures, descBERequests, descBEBytes, descFwdPackets, descFwdBytes, descQueued, descQueueDrops} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	f := c.f
	counts := f.table.Count()
	for _, st := range []conntab.State{conntab.Handoffing, conntab.Handoffed, conntab.TimeWait} {
		ch <- prometheus.MustNewConstMetric(descConns, prometheus.GaugeValue, float64(counts[st]), st.String())
	}
	for _, b := range f.sched.Statuses() {
		ch <- prometheus.MustNewConstMetric(descUp, prometheus.GaugeValue, boolFloat(b.Available), b.Addr)
		ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, float64(b.Active), b.Addr)
		ch <- prometheus.MustNewConstMetric(descLive, prometheus.GaugeValue, float64(b.Live), b.Addr)
		ch <- prometheus.MustNewConstMetric(descWeight, prometheus.GaugeValue, float64(b.Weight), b.Addr)
		ch <- prometheus.MustNewConstMetric(descBEHandoffs, prometheus.CounterValue, float64(b.Handoffs), b.Addr)
		ch <- prometheus.MustNewConstMetric(descBEFailures, prometheus.CounterValue, float64(b.Failures), b.Addr)
		if st, ok := f.relayStats.get(b.Server.Addr); ok {
			ch <- prometheus.MustNewConstMetric(descBERequests, prometheus.CounterValue, float64(st.Requests), b.Addr)
			ch <- prometheus.MustNewConstMetric(descBEBytes, prometheus.CounterValue, float64(st.BytesIn), b.Addr, "in")
			ch <- prometheus.MustNewConstMetric(descBEBytes, prometheus.CounterValue, float64(st.BytesOut), b.Addr, "out")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if pk, by, err := f.flows.Forwarded(ctx); err == nil {
		ch <- prometheus.MustNewConstMetric(descFwdPackets, prometheus.CounterValue, float64(pk))
		ch <- prometheus.MustNewConstMetric(descFwdBytes, prometheus.CounterValue, float64(by))
	}
	for _, q := range f.obs.Packets() {
		event := q.Event
		if event == "" {
			event = "none"
		}
		ch <- prometheus.MustNewConstMetric(descQueued, prometheus.CounterValue, float64(q.N), event, string(q.Reason))
	}
	if queue, user, err := queueDrops("/proc/net/netfilter/nfnetlink_queue", f.cfg.QueueNum); err == nil {
		ch <- prometheus.MustNewConstMetric(descQueueDrops, prometheus.CounterValue, float64(queue), "queue")
		ch <- prometheus.MustNewConstMetric(descQueueDrops, prometheus.CounterValue, float64(user), "user")
	}
}

// queueDrops reads a queue's drop counters from the kernel's table (one
// line per bound queue: number, port id, queued, copy mode, copy range,
// queue_dropped, user_dropped, id sequence, 1).
func queueDrops(path string, num uint16) (queue, user uint64, err error) {
	fh, err := os.Open(path)
	if err != nil {
		return 0, 0, err
	}
	defer fh.Close()
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 7 || f[0] != strconv.Itoa(int(num)) {
			continue
		}
		queue, err1 := strconv.ParseUint(f[5], 10, 64)
		user, err2 := strconv.ParseUint(f[6], 10, 64)
		if err1 != nil || err2 != nil {
			return 0, 0, fmt.Errorf("%s: %q", path, sc.Text())
		}
		return queue, user, nil
	}
	return 0, 0, fmt.Errorf("%s: queue %d not bound", path, num)
}
