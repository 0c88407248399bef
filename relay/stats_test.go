package relay

import (
	"bufio"
	"bytes"
	"fmt"
	"net/http"
	"testing"
	"time"
)

// The relay counts its requests and the bytes from and to clients: a
// request head, a body (buffered, written, spliced, chunked) and every
// response byte, head included.
func TestRelayByteCounters(t *testing.T) {
	w := newWebServer(t)
	r := newRelay(t, w.addr)
	c := connect(t, r)
	br := bufio.NewReader(c)
	var sentBody int64
	for _, n := range []int{10, 20 << 10, 1 << 20} {
		data := bytes.Repeat([]byte("x"), n)
		go func() {
			fmt.Fprintf(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", n)
			c.Write(data)
		}()
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		if b := body(t, resp); len(b) != n {
			t.Fatalf("%d-byte body echoed as %d bytes", n, len(b))
		}
		sentBody += int64(n)
	}
	fmt.Fprint(c, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	body(t, resp)
	get(t, c, br, "GET", "/small").Body.Close()
	// Everything the client read came through the relay's counters.
	var got int64
	deadline := time.Now().Add(2 * time.Second)
	for {
		st := r.Stats()
		got = st.BytesOut
		if st.Requests == 5 && st.BytesIn > sentBody && got > sentBody {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("stats %+v, want 5 requests, more than %d bytes in and out", st, sentBody)
		}
		time.Sleep(10 * time.Millisecond)
	}
	st := r.Stats()
	// In: the bodies and five heads of a few dozen bytes each, rewritten
	// as the relay sends them upstream.
	if st.BytesIn > sentBody+5*512 {
		t.Errorf("bytes in %d for %d body bytes and five heads", st.BytesIn, sentBody)
	}
	// Out: the echoed bodies, the chunked one, "small" and heads.
	if st.BytesOut < sentBody+10+5 || st.BytesOut > sentBody+15+5*512 {
		t.Errorf("bytes out %d for %d body bytes", st.BytesOut, sentBody)
	}
}
