package relay

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// handOver moves every session of from to a new relay on the same web
// server, as a BE's upgrade does, and returns the new relay.
func handOver(t *testing.T, from *Relay, addr string) (*Relay, []Handed) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	handed := from.Handover(ctx)
	to := newRelay(t, addr)
	for _, h := range handed {
		if err := to.Resume(h); err != nil {
			t.Fatal(err)
		}
	}
	return to, handed
}

func TestHandoverIdleSession(t *testing.T) {
	w := newWebServer(t)
	a := newRelay(t, w.addr)
	c := connect(t, a)
	br := bufio.NewReader(c)
	if b := body(t, get(t, c, br, "GET", "/small")); b != "small" {
		t.Fatal(b)
	}
	_, handed := handOver(t, a, w.addr)
	if len(handed) != 1 || handed[0].State.Body != "" || handed[0].Upstream != nil {
		t.Fatalf("handed %+v", handed)
	}
	// The same connection, now served by the successor.
	if b := body(t, get(t, c, br, "GET", "/chunked")); b != "part0;part1;part2;part3;part4;" {
		t.Errorf("after the handover: %q", b)
	}
	c.Close()
	a.Wait()
}

// slowRead reads a response body at about rate bytes a second.
func slowRead(r io.Reader, rate int) ([]byte, error) {
	var out bytes.Buffer
	chunk := make([]byte, rate/100)
	for {
		n, err := r.Read(chunk)
		out.Write(chunk[:n])
		if err == io.EOF {
			return out.Bytes(), nil
		}
		if err != nil {
			return out.Bytes(), err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A 5 MB response read slowly moves to the successor in its middle, with a
// pipelined request behind it: the client gets both whole and in order.
func TestHandoverMidBody(t *testing.T) {
	w := newWebServer(t)
	a := newRelay(t, w.addr)
	c := connect(t, a)
	c.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprint(c, "GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /small HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan []byte, 1)
	go func() { b, _ := slowRead(resp.Body, 20<<20); got <- b }()
	time.Sleep(100 * time.Millisecond)
	b2, handed := handOver(t, a, w.addr)
	if len(handed) != 1 || handed[0].State.Body != "length" || handed[0].State.Remaining <= 0 {
		t.Fatalf("handed %+v", handed)
	}
	t.Logf("handed over with %d of %d bytes to go, %d pipelined bytes", handed[0].State.Remaining,
		len(w.big), len(handed[0].State.ClientBuf))
	if b := <-got; !bytes.Equal(b, w.big) {
		t.Fatalf("body across the handover: %d bytes, want %d, equal %v", len(b), len(w.big), bytes.Equal(b, w.big))
	}
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b := body(t, resp); b != "small" {
		t.Errorf("the pipelined request after the handover: %q", b)
	}
	c.Close()
	a.Wait()
	b2.Wait()
}

func TestHandoverMidChunked(t *testing.T) {
	gate := make(chan struct{})
	ln, _ := net.Listen("tcp4", "127.0.0.1:0")
	defer ln.Close()
	go http.Serve(ln, http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		rw.Header().Set("Trailer", "X-End")
		io.WriteString(rw, "before;")
		rw.(http.Flusher).Flush()
		<-gate
		io.WriteString(rw, "after;")
		rw.Header().Set("X-End", "yes")
	}))
	a := newRelay(t, ln.Addr().String())
	c := connect(t, a)
	br := bufio.NewReader(c)
	fmt.Fprint(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, len("before;"))
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatal(err)
	}
	_, handed := handOver(t, a, ln.Addr().String())
	if len(handed) != 1 || handed[0].State.Body != "chunked" {
		t.Fatalf("handed %+v", handed)
	}
	close(gate)
	rest, err := io.ReadAll(resp.Body)
	if err != nil || string(first)+string(rest) != "before;after;" || resp.Trailer.Get("X-End") != "yes" {
		t.Errorf("chunked body across the handover: %q%q %v trailer %q", first, rest, err, resp.Trailer.Get("X-End"))
	}
	c.Close()
}
