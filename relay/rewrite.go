package relay

import (
	"bytes"
	"net"
	"net/netip"
	"slices"

	"tcpha/phttp"
)

// requestOut is what goes to the web server of a request whose head is
// head (h, parsed from it), and whether the upstream connection may serve
// another request after it. `Connection: close` is hop-by-hop (RFC 9110
// section 7.6.1): dropped, it leaves the upstream connection reusable; the
// relay closes the client's connection itself once the response is
// through. Empty lines before the request line are left out: the web
// server need not be as tolerant as we are. An upgrade ends with the
// tunnel, which takes the upstream connection along.
//
// With a valid forFor, the client's address is added to the request's
// X-Forwarded-For: appended to its last such header, or in a new one, the
// way proxies chain it, so that nginx's realip module (trusting
// 127.0.0.1) takes it as the client.
func requestOut(head []byte, h *phttp.Head, forFor netip.Addr) (out net.Buffers, upKeep bool) {
	upKeep = h.KeepAlive || h.Proto == "HTTP/1.1" && h.ConnClose
	var edits []headEdit
	if !h.KeepAlive && upKeep {
		edits = append(edits, headEdit{at: h.ConnLine[0], skip: h.ConnLine[1] - h.ConnLine[0]})
	}
	if forFor.IsValid() {
		if h.XFFEnd > 0 {
			edits = append(edits, headEdit{at: h.XFFEnd, ins: []byte(", " + forFor.String())})
		} else {
			edits = append(edits, headEdit{at: len(head) - blankLen(head), ins: []byte("X-Forwarded-For: " + forFor.String() + "\r\n")})
		}
	}
	if h.Upgrade {
		upKeep = false
	}
	return spliceHead(head, h.Start, edits), upKeep
}

// headEdit leaves skip bytes out at at, then puts ins there.
type headEdit struct {
	at, skip int
	ins      []byte
}

// spliceHead is head from start on with edits, which do not overlap,
// made.
func spliceHead(head []byte, start int, edits []headEdit) net.Buffers {
	slices.SortFunc(edits, func(a, b headEdit) int { return a.at - b.at })
	var out net.Buffers
	pos := start
	for _, e := range edits {
		if e.at > pos {
			out = append(out, head[pos:e.at])
		}
		if len(e.ins) > 0 {
			out = append(out, e.ins)
		}
		pos = e.at + e.skip
	}
	if pos < len(head) {
		out = append(out, head[pos:])
	}
	return out
}

// blankLen is the length of the blank line that ends head.
func blankLen(head []byte) int {
	if bytes.HasSuffix(head, []byte("\r\n\r\n")) {
		return 2
	}
	return 1
}

var connClose = []byte("Connection: close\r\n")

// responseHead is what goes to the client of the response head head (rh,
// parsed from it): as the web server sent it, except that when the client
// does not keep its connection (clientKeep false) and the web server's
// answer would, the head says the connection closes: the relay kept the
// upstream connection open and ends the client's itself.
func responseHead(head []byte, rh *phttp.Head, clientKeep bool) net.Buffers {
	if clientKeep || !rh.KeepAlive || rh.Body == phttp.BodyTunnel {
		return net.Buffers{head}
	}
	if rh.ConnLine[1] > 0 { // `Connection: keep-alive` becomes close
		return net.Buffers{head[:rh.ConnLine[0]], connClose, head[rh.ConnLine[1]:]}
	}
	// Inserted before the blank line.
	blank := blankLen(head)
	return net.Buffers{head[:len(head)-blank], connClose, head[len(head)-blank:]}
}

// afterResponse says what follows a response rh: whether the client's
// connection goes on to another request, and whether the upstream
// connection may serve another, as each side allows (clientKeep, upKeep)
// and the response's framing does: a body that ends with the web server's
// close, or a tunnel, ends both.
func afterResponse(clientKeep, upKeep bool, rh *phttp.Head) afterBody {
	framed := rh.KeepAlive && rh.Body != phttp.BodyClose && rh.Body != phttp.BodyTunnel
	return afterBody{more: clientKeep && framed, reuse: upKeep && framed}
}
