package queue

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"

	"tcpha/phttp"
)

// hereUnless is the cluster's rules for the tests: a request is this BE's
// unless its path starts with /other.
func hereUnless(h *phttp.Head) bool { return !strings.HasPrefix(h.Path, "/other") }

const (
	getHere  = "GET /here HTTP/1.1\r\nHost: a\r\n\r\n"
	getOther = "GET /other HTTP/1.1\r\nHost: a\r\n\r\n"
)

type seg struct {
	off  int // from the stream's start
	data string
	keep int // -1: all
	r    Reason
}

func TestStream(t *testing.T) {
	post := fmt.Sprintf("POST /here HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n", len(getOther)) + getOther // a body that looks like a request
	chunked := "POST /here HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
	cases := []struct {
		name  string
		first string // the handoff's bytes, already with the server
		segs  []seg
		held  string // what Moving holds at the end
	}{
		{"a request for this BE", getHere, []seg{{len(getHere), getHere, -1, ReasonHere}}, ""},
		{"a request for another BE is held", getHere, []seg{
			{len(getHere), getOther, 0, ReasonWillHand},
			{len(getHere), getOther, 0, ReasonWillHand}, // the client's retransmission
		}, getOther},
		{"a head split over segments waits whole", getHere, []seg{
			{len(getHere), getHere[:7], 0, ReasonHeadSplit},
			{len(getHere) + 7, getHere[7:], -1, ReasonHere},
			{len(getHere), getHere[:7], -1, ReasonRetransmit},
		}, ""},
		{"a split head for another BE", getHere, []seg{
			{len(getHere), getOther[:7], 0, ReasonHeadSplit},
			{len(getHere) + 7, getOther[7:], 0, ReasonWillHand},
		}, getOther},
		{"pipelined: this BE's, then another's", getHere, []seg{
			{len(getHere), getHere + getOther, len(getHere), ReasonCut},
			{2 * len(getHere), getOther, 0, ReasonWillHand},
		}, getOther},
		{"pipelined, all this BE's", getHere, []seg{{len(getHere), getHere + getHere + "\r\n" + getHere, -1, ReasonHere}}, ""},
		{"a body is no request", getHere, []seg{
			{len(getHere), post[:60], -1, ReasonHere},
			{len(getHere) + 60, post[60:], -1, ReasonHere},
			{len(getHere) + len(post), getOther, 0, ReasonWillHand},
		}, getOther},
		{"a chunked body", getHere, []seg{
			{len(getHere), chunked[:70], -1, ReasonHere},
			{len(getHere) + 70, chunked[70:] + getOther, len(chunked) - 70, ReasonCut},
		}, getOther},
		{"the handoff's body goes on", post[:60], []seg{
			{60, post[60:], -1, ReasonHere},
			{len(post), getHere, -1, ReasonHere},
		}, ""},
		{"a head the server already has part of is its own", getHere + getOther[:10], []seg{
			{len(getHere) + 10, getOther[10:], -1, ReasonHere},
			{len(getHere) + len(getOther), getOther, 0, ReasonWillHand},
		}, getOther},
		{"bytes after a gap", getHere, []seg{
			{len(getHere) + 5, getHere[5:], 0, ReasonOutOfOrder},
			{len(getHere), getHere, -1, ReasonHere},
		}, ""},
		{"an upgrade: everything after is the server's", getHere, []seg{
			{len(getHere), "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n" + getOther, -1, ReasonHere},
		}, ""},
		{"a malformed head is the server's to refuse", getHere, []seg{
			{len(getHere), "GET\r\n\r\n" + getOther, -1, ReasonHere},
		}, ""},
		{"a head over maxheader is the server's", getHere, []seg{
			{len(getHere), "GET /other HTTP/1.1\r\nX: " + strings.Repeat("a", 300), -1, ReasonHere},
		}, ""},
		{"empty lines alone pass", getHere, []seg{{len(getHere), "\r\n", -1, ReasonHere}}, ""},
	}
	for _, tc := range cases {
		for _, base := range []uint32{1000, 0xffffffff - 20} { // and across the wrap
			s := NewStream(base, []byte(tc.first), 256)
			for i, g := range tc.segs {
				keep, r := s.Segment(base+uint32(g.off), []byte(g.data), hereUnless)
				want := g.keep
				if want < 0 {
					want = len(g.data)
				}
				if keep != want || r != g.r {
					t.Errorf("%s (seq %d) segment %d: keep %d %v, want %d %v", tc.name, base, i, keep, r, want, g.r)
				}
			}
			h, held, seq := s.Moving()
			if string(held) != tc.held || (h != nil) != (tc.held != "") {
				t.Errorf("%s (seq %d): held %q (%v), want %q", tc.name, base, held, h, tc.held)
			}
			if h != nil && seq != s.Next() {
				t.Errorf("%s: held from %d, next %d", tc.name, seq, s.Next())
			}
		}
	}
}

// A move that fails serves the held request here: its retransmission is
// let through, up to the next request's start, which is judged anew.
func TestStreamStay(t *testing.T) {
	s := NewStream(0, []byte(getHere), 8192)
	n := uint32(len(getHere))
	first := []byte(getOther + getHere[:5])
	if keep, r := s.Segment(n, first, hereUnless); keep != 0 || r != ReasonWillHand {
		t.Fatalf("keep %d %v", keep, r)
	}
	s.Stay()
	if h, _, _ := s.Moving(); h != nil {
		t.Fatal("still moving after Stay")
	}
	if keep, r := s.Segment(n, first, hereUnless); keep != len(getOther) || r != ReasonCut {
		t.Errorf("after Stay: keep %d %v, want the held request's %d bytes", keep, r, len(getOther))
	}
	if keep, r := s.Segment(n+uint32(len(first)), []byte(getHere[5:]), hereUnless); keep != len(getHere)-5 || r != ReasonHere {
		t.Errorf("the rest of the next head: keep %d %v", keep, r)
	}
	if keep, r := s.Segment(n, first, hereUnless); keep != len(first) || r != ReasonRetransmit {
		t.Errorf("the first segment again: keep %d %v", keep, r)
	}
}

// The bytes held for a move are bounded: the rest the client sends again.
func TestStreamHoldBound(t *testing.T) {
	s := NewStream(0, nil, 256)
	body := "POST /other HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
	s.Segment(0, []byte(body), hereUnless)
	chunk := bytes.Repeat([]byte("x"), 1400)
	for off := len(body); off < 100000; off += len(chunk) {
		if keep, _ := s.Segment(uint32(off), chunk, hereUnless); keep != 0 {
			t.Fatalf("keep %d of a held body", keep)
		}
	}
	if _, held, _ := s.Moving(); len(held) > 256+holdExtra {
		t.Errorf("held %d bytes", len(held))
	}
}

func TestTruncate(t *testing.T) {
	b := pkt("10.0.0.10:40000", "10.0.0.100:80", fin|ack, 10)
	binary.BigEndian.PutUint32(b[24:], 7777)
	copy(b[40:], "0123456789")
	s, err := ParseSegment(b)
	if err != nil || s.Seq != 7777 || string(s.Data) != "0123456789" {
		t.Fatalf("%+v %v", s, err)
	}
	out, err := s.Truncate(b, 4)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseSegment(out)
	if err != nil || string(c.Data) != "0123" || c.FIN || !c.ACK || c.Seq != 7777 {
		t.Fatalf("cut: %+v %v", c, err)
	}
	if checksum(out[:20], 0) != 0 {
		t.Error("IP checksum does not verify")
	}
	var sum uint32
	for i := 12; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(out[i:]))
	}
	sum += 6 + uint32(len(out)-20)
	if checksum(out[20:], sum) != 0 {
		t.Error("TCP checksum does not verify")
	}
	if _, err := s.Truncate(b, 11); err == nil {
		t.Error("kept more than the payload")
	}
}

// FuzzStream cuts a stream of requests into segments and judges them:
// whatever the bytes and the cuts, the bytes let through are a prefix of
// the stream that only grows, a segment keeps at most its bytes, and the
// bytes held stay bounded.
func FuzzStream(f *testing.F) {
	f.Add([]byte(getHere+getOther), []byte{5, 40, 3})
	f.Add([]byte("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"+getOther), []byte{1, 2, 200})
	f.Fuzz(func(t *testing.T, stream []byte, cuts []byte) {
		s := NewStream(0xfffffff0, nil, 512)
		off := 0
		next := s.Next()
		for i := 0; off < len(stream) && i < 200; i++ {
			n := 1
			if len(cuts) > 0 {
				n = int(cuts[i%len(cuts)]) + 1
			}
			end := min(len(stream), off+n)
			seq := 0xfffffff0 + uint32(off)
			keep, _ := s.Segment(seq, stream[off:end], hereUnless)
			if keep < 0 || keep > end-off {
				t.Fatalf("keep %d of %d", keep, end-off)
			}
			if d := diff(s.Next(), next); d < 0 {
				t.Fatalf("next went back by %d", -d)
			}
			next = s.Next()
			if keep > 0 && diff(seq+uint32(keep), next) > 0 {
				t.Fatalf("kept past next")
			}
			if _, held, _ := s.Moving(); len(held) > 512+holdExtra {
				t.Fatalf("held %d", len(held))
			}
			if keep == end-off || keep == 0 && i%3 == 0 {
				off = end // as the kernel acks, or the client skips on
			} else if keep > 0 {
				off += keep
			}
		}
	})
}
