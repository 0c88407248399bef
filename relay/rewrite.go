package relay

import (
	"bytes"
	"net"

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
func requestOut(head []byte, h *phttp.Head) (out net.Buffers, upKeep bool) {
	out = net.Buffers{head[h.Start:]}
	upKeep = h.KeepAlive || h.Proto == "HTTP/1.1" && h.ConnClose
	if !h.KeepAlive && upKeep {
		out = net.Buffers{head[h.Start:h.ConnLine[0]], head[h.ConnLine[1]:]}
	}
	if h.Upgrade {
		upKeep = false
	}
	return out, upKeep
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
	blank := 2
	if !bytes.HasSuffix(head, []byte("\r\n\r\n")) {
		blank = 1
	}
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
