package be

import (
	"fmt"
	"io"
	"net/netip"
	"text/tabwriter"
	"time"

	"tcpha/admin"
	"tcpha/handoff/conntab"
)

// ConnRow is one line of `tcphactl conns` on a BE: a connection handed
// to it that its relay serves (the seed's ESTABLISHED on a BE).
type ConnRow struct {
	Client     string  `json:"client"`
	ClientPort uint16  `json:"client_port"`
	State      string  `json:"state"`
	Age        float64 `json:"age_seconds"`
	Requests   int     `json:"requests"`
}

// Conns writes the connections the relay serves that flt passes (a BE's
// rows have no be) to text and returns them.
func (b *BE) Conns(text io.Writer, flt admin.ConnFilter) []ConnRow {
	now := time.Now()
	rows := []ConnRow{}
	for _, c := range b.relay.Conns() {
		state := c.State.String()
		if !flt.Match(c.Client, netip.Addr{}, state) {
			continue
		}
		switch {
		case c.State != conntab.Established:
		case c.Busy:
			state += " busy"
		default:
			state += " idle"
		}
		rows = append(rows, ConnRow{Client: c.Client.Addr().String(), ClientPort: c.Client.Port(), State: state,
			Age: now.Sub(c.Since).Truncate(time.Second).Seconds(), Requests: c.Requests})
	}
	rows = append(rows, b.bhRows(now, flt)...)
	tw := tabwriter.NewWriter(text, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "client\tstate\tage\trequests\t")
	for _, c := range rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t\n", netip.AddrPortFrom(netip.MustParseAddr(c.Client), c.ClientPort), c.State,
			time.Duration(c.Age)*time.Second, c.Requests)
	}
	tw.Flush()
	return rows
}
