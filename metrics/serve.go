package metrics

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Serve serves /metrics on metricsAddr and the Go profiles
// (/debug/pprof/) on pprofAddr until stop is called; an empty address
// serves nothing, and equal addresses share one listener. Profiles are off
// unless configured: they reveal the agent's memory and cost CPU while
// taken. Once stop returns, the addresses are free (for a successor).
func Serve(m *Metrics, metricsAddr, pprofAddr string, log *slog.Logger) (stop func(), err error) {
	muxes := map[string]*http.ServeMux{}
	mux := func(addr string) *http.ServeMux {
		if muxes[addr] == nil {
			muxes[addr] = http.NewServeMux()
		}
		return muxes[addr]
	}
	if metricsAddr != "" {
		mux(metricsAddr).Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	}
	if pprofAddr != "" {
		x := mux(pprofAddr)
		x.HandleFunc("/debug/pprof/", pprof.Index)
		x.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		x.HandleFunc("/debug/pprof/profile", pprof.Profile)
		x.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		x.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	var servers []*http.Server
	var lns []net.Listener
	stop = func() {
		for _, s := range servers {
			s.Close()
		}
		for _, ln := range lns {
			ln.Close()
		}
	}
	for addr, h := range muxes {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			stop()
			return nil, fmt.Errorf("listen for metrics/pprof on %s: %w", addr, err)
		}
		s := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		servers, lns = append(servers, s), append(lns, ln)
		go func() {
			if err := s.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				log.Error("metrics server stopped", "op", "metrics", "addr", addr, "err", err)
			}
		}()
		log.Info("serving", "op", "metrics", "addr", addr, "metrics", addr == metricsAddr, "pprof", addr == pprofAddr)
	}
	return stop, nil
}
