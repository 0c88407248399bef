// Package tlshello reads a TLS ClientHello from a connection without
// terminating TLS: just enough to route it (the SNI) and log it (the ALPN
// list, the highest version offered), keeping every byte it read so that
// the connection can be handed off with them as its request, the way the FE
// hands off an HTTP request head (seed 4.2.2). The BE's own TLS server then
// sees the ClientHello unchanged.
//
// It is pure: bytes in, a Hello or a typed refusal out. The caller bounds the
// time with a read deadline (requesttimeout) and the bytes with max.
//
// The FE's TLS listener (`[fe] tlsport`, frontend/tls.go) uses it.
package tlshello

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"

	"golang.org/x/crypto/cryptobyte"

	"tcpha/phttp"
)

// Max is the default bound on the bytes a ClientHello may take on the
// wire, record headers included (the 16 KiB). Real hellos are far
// smaller: Go 1.26's, with its X25519MLKEM768 key share, is 1.5 KiB;
// OpenSSL 3.0's and curl's in testdata/hello are 200 to 520 bytes.
const Max = 16 << 10

// TLS record layer (RFC 8446 section 5.1, RFC 5246 section 6.2.1).
const (
	recordHeaderLen = 5
	// maxPlaintext is the largest plaintext record body; a longer one is
	// refused with record_overflow (RFC 8446 section 5.1; crypto/tls does
	// the same).
	maxPlaintext = 1 << 14

	recordChangeCipherSpec = 20
	recordAlert            = 21
	recordHandshake        = 22
	recordApplicationData  = 23
	recordHeartbeat        = 24

	typeClientHello = 1

	extServerName        = 0  // RFC 6066 section 3
	extALPN              = 16 // RFC 7301 section 3.1
	extSupportedVersions = 43 // RFC 8446 section 4.2.1
	nameTypeHostName     = 0
)

// Hello is what the reader learned from a ClientHello.
type Hello struct {
	// SNI is the server_name extension's host_name, lower-cased; "" when
	// the client sent none or sent an IP literal (RFC 6066 section 3 does
	// not allow them; such a client is routed like one without SNI).
	SNI string
	// ALPN is the application_layer_protocol_negotiation list in the
	// client's order, nil without the extension. For the log only.
	ALPN []string
	// Version is the highest version the client offers: the largest
	// non-GREASE entry of supported_versions when it is there, else the
	// legacy_version field (0x0303 is TLS 1.2, 0x0304 TLS 1.3). For the
	// log only.
	Version uint16
	// Raw is every byte read from the connection: the records that carry
	// the ClientHello, headers included, and nothing after them.
	Raw []byte
	// Records is how many TLS records carried the ClientHello.
	Records int
}

// Reason says why a connection's first bytes were refused. Its String is
// a stable metric label.
type Reason uint8

const (
	ReasonNone Reason = iota
	// ReasonTimeout: the read deadline passed before the ClientHello was
	// whole.
	ReasonTimeout
	// ReasonEmpty: the client closed (or reset) before sending a byte.
	ReasonEmpty
	// ReasonTruncated: the client closed, or a read failed, inside the
	// ClientHello.
	ReasonTruncated
	// ReasonHTTP: a plain HTTP request on the TLS port.
	ReasonHTTP
	// ReasonSSLv2: an SSL 2.0 or SSLv2-compatible ClientHello (RFC 5246
	// appendix E.2), which carries no extensions and so no SNI. RFC 6176
	// forbids SSL 2.0.
	ReasonSSLv2
	// ReasonGarbage: the first bytes are no TLS record at all.
	ReasonGarbage
	// ReasonAlert: the client's first record is an alert.
	ReasonAlert
	// ReasonUnexpected: a record other than handshake or alert, or a
	// handshake message other than ClientHello.
	ReasonUnexpected
	// ReasonVersion: a handshake record whose version is not 3.x.
	ReasonVersion
	// ReasonRecordOverflow: a record body longer than 2^14 bytes.
	ReasonRecordOverflow
	// ReasonOversized: the ClientHello would take more than max bytes,
	// record headers included.
	ReasonOversized
	// ReasonMalformed: the ClientHello, or an extension the reader uses,
	// does not decode.
	ReasonMalformed
	// ReasonBadSNI: the host_name is not a DNS name (RFC 1123 labels; an
	// underscore is allowed, as real names have them).
	ReasonBadSNI
	numReasons
)

var reasonNames = [numReasons]string{"none", "timeout", "empty", "truncated", "http", "sslv2", "garbage", "alert",
	"unexpected", "version", "record_overflow", "oversized", "malformed", "bad_sni"}

func (r Reason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return fmt.Sprintf("reason(%d)", uint8(r))
}

// Reasons lists every refusal reason, for metrics that want all labels
// present from the start.
func Reasons() []Reason {
	rs := make([]Reason, 0, numReasons-1)
	for r := ReasonNone + 1; r < numReasons; r++ {
		rs = append(rs, r)
	}
	return rs
}

// Error is a refusal: why, and the read error or detail behind it.
type Error struct {
	Reason Reason
	Err    error
}

func (e *Error) Error() string {
	if e.Err == nil {
		return "read TLS ClientHello: " + e.Reason.String()
	}
	return "read TLS ClientHello: " + e.Reason.String() + ": " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

func refuse(r Reason, format string, args ...any) *Error {
	return &Error{Reason: r, Err: fmt.Errorf(format, args...)}
}

// ReasonOf is err's refusal reason: ReasonNone for nil, ReasonTruncated for
// an error that is not a refusal (none comes from Read).
func ReasonOf(err error) Reason {
	if err == nil {
		return ReasonNone
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ReasonTruncated
}

// Alert descriptions (RFC 8446 section 6).
const (
	AlertUnexpectedMessage = 10
	AlertRecordOverflow    = 22
	AlertHandshakeFailure  = 40
	AlertIllegalParameter  = 47
	AlertDecodeError       = 50
	AlertProtocolVersion   = 70
	AlertInternalError     = 80
	AlertUnrecognizedName  = 112
)

// alerts is the fatal alert each reason is answered with; 0 means close
// without one: the peer is gone or silent (timeout, empty, truncated), is
// not speaking TLS (garbage; HTTP gets Reply's 400 instead), or already
// gave up (alert). The choices follow what the BE's own server would send,
// so a client sees the same refusal with and without tcpha in the path:
// crypto/tls for SSLv2, unexpected records and record_overflow; OpenSSL's
// illegal_parameter for a hello over its size limit (SSL_R_EXCESSIVE_MESSAGE_SIZE),
// and its unrecognized_name for a host_name it cannot use.
var alerts = [numReasons]uint8{
	ReasonSSLv2:          AlertProtocolVersion,
	ReasonUnexpected:     AlertUnexpectedMessage,
	ReasonVersion:        AlertProtocolVersion,
	ReasonRecordOverflow: AlertRecordOverflow,
	ReasonOversized:      AlertIllegalParameter,
	ReasonMalformed:      AlertDecodeError,
	ReasonBadSNI:         AlertUnrecognizedName,
}

// Alert is the fatal TLS alert record to send before closing a connection
// Read refused with err, or nil when the right answer is to close
// silently.
func Alert(err error) []byte {
	var e *Error
	if !errors.As(err, &e) || e.Reason >= numReasons || alerts[e.Reason] == 0 {
		return nil
	}
	return AlertRecord(alerts[e.Reason])
}

// AlertRecord is a fatal alert with description desc as one plaintext
// record. Its version is 0x0301, as crypto/tls writes before a version is
// negotiated, so that clients of every version read it.
func AlertRecord(desc uint8) []byte {
	return []byte{recordAlert, 3, 1, 0, 2, 2 /* fatal */, desc}
}

// Reply is what to write before closing a connection Read refused with
// err: Alert's record, or for plain HTTP on the TLS port an HTTP 400 that
// says so (nginx and Go's net/http answer the same way), or nil.
func Reply(err error) []byte {
	if ReasonOf(err) == ReasonHTTP {
		return phttp.ErrorResponse(400, "plain HTTP request sent to the HTTPS port")
	}
	return Alert(err)
}

// Read reads one ClientHello from r, reading at most limit bytes (record
// headers included; Max is the bound) and never past the last
// record that carries it. The caller bounds the time with a read deadline;
// r's timeout errors (net.Error.Timeout) become ReasonTimeout. Every error
// is an *Error.
func Read(r io.Reader, limit int) (*Hello, error) {
	s := scanner{limit: limit}
	for idle := 0; ; {
		want, h, err := s.scan()
		if h != nil || err != nil {
			return h, err
		}
		if want > cap(s.buf) {
			// A hello usually fits the first buffer: one allocation.
			nb := make([]byte, len(s.buf), min(limit, max(want, 2*cap(s.buf), 2048)))
			copy(nb, s.buf)
			s.buf = nb
		}
		// Only what the records still need: never a byte past them.
		n, rerr := r.Read(s.buf[len(s.buf):want])
		s.buf = s.buf[:len(s.buf)+n]
		if rerr != nil {
			if n > 0 {
				// Judge what arrived with the error first: it may
				// complete the hello or refuse it for a better reason.
				if _, h, err := s.scan(); h != nil || err != nil {
					return h, err
				}
			}
			return nil, s.readError(rerr)
		}
		if idle++; n > 0 {
			idle = 0
		} else if idle >= 100 {
			return nil, s.readError(io.ErrNoProgress)
		}
	}
}

// scanner walks the records in buf as they arrive, remembering where it
// got to, so that a hello in many small reads is scanned once.
type scanner struct {
	limit int
	buf   []byte // every byte read
	off   int    // end of the last whole record in buf
	// records is the number of whole records; msgLen the handshake bytes
	// in them; hdr the handshake message header (type, uint24 length) as
	// far as it has arrived; total the message's length with its header,
	// once known.
	records int
	msgLen  int
	hdr     [4]byte
	total   int
}

func (s *scanner) readError(err error) *Error {
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		return &Error{Reason: ReasonTimeout, Err: fmt.Errorf("after %d bytes: %w", len(s.buf), err)}
	case len(s.buf) == 0:
		return &Error{Reason: ReasonEmpty, Err: err}
	}
	return &Error{Reason: ReasonTruncated, Err: fmt.Errorf("after %d bytes: %w", len(s.buf), err)}
}

// scan returns the hello, a refusal, or the length buf must reach before
// scanning again.
func (s *scanner) scan() (want int, h *Hello, err error) {
	for {
		if s.off == 0 && len(s.buf) > 0 {
			if err := s.first(); err != nil {
				return 0, nil, err
			}
		}
		if len(s.buf) < s.off+recordHeaderLen {
			return s.need(s.off + recordHeaderLen)
		}
		rec := s.buf[s.off:]
		typ, major, n := rec[0], rec[1], int(rec[3])<<8|int(rec[4])
		switch {
		case typ == recordAlert:
			return 0, nil, refuse(ReasonAlert, "alert record (level %d, description %d) instead of a ClientHello", at(rec, 5), at(rec, 6))
		case typ != recordHandshake:
			return 0, nil, refuse(ReasonUnexpected, "record type %d inside the ClientHello", typ)
		case major != 3:
			return 0, nil, refuse(ReasonVersion, "handshake record version %d.%d", major, rec[2])
		case n > maxPlaintext:
			return 0, nil, refuse(ReasonRecordOverflow, "handshake record of %d bytes", n)
		case n == 0:
			// RFC 8446 section 5.1: "Implementations MUST NOT send
			// zero-length fragments of Handshake types".
			return 0, nil, refuse(ReasonMalformed, "empty handshake record")
		}
		end := s.off + recordHeaderLen + n
		if len(s.buf) < end {
			return s.need(end)
		}
		body := s.buf[s.off+recordHeaderLen : end]
		for i := 0; s.msgLen+i < len(s.hdr) && i < len(body); i++ {
			s.hdr[s.msgLen+i] = body[i]
		}
		s.msgLen += n
		s.records++
		s.off = end
		if s.total == 0 && s.msgLen >= len(s.hdr) {
			if s.hdr[0] != typeClientHello {
				return 0, nil, refuse(ReasonUnexpected, "handshake message type %d instead of ClientHello", s.hdr[0])
			}
			s.total = len(s.hdr) + (int(s.hdr[1])<<16 | int(s.hdr[2])<<8 | int(s.hdr[3]))
			// The record headers so far and the message: the least it
			// can take.
			if s.off-s.msgLen+s.total > s.limit {
				return 0, nil, refuse(ReasonOversized, "ClientHello of %d bytes", s.total)
			}
		}
		if s.total > 0 && s.msgLen >= s.total {
			h, err := s.hello()
			return 0, h, err
		}
	}
}

// need asks for buf to reach end, refusing a hello that would not fit in
// max bytes.
func (s *scanner) need(end int) (int, *Hello, error) {
	if end > s.limit {
		if s.total > 0 {
			return 0, nil, refuse(ReasonOversized, "ClientHello of %d bytes in records of %d bytes or more", s.total, s.off+1)
		}
		return 0, nil, refuse(ReasonOversized, "no ClientHello within %d bytes", s.limit)
	}
	return end, nil, nil
}

// first classifies a connection by its first bytes, before any record is
// read whole: what is not a TLS record at all is refused as soon as it is
// recognised (with up to a record header's worth of bytes).
func (s *scanner) first() error {
	b := s.buf
	switch b[0] {
	case recordHandshake, recordAlert, recordChangeCipherSpec, recordApplicationData, recordHeartbeat:
		if len(b) >= 2 && b[1] != 3 && b[0] != recordHandshake {
			return refuse(ReasonGarbage, "record type %d with version %d", b[0], b[1])
		}
		return nil
	}
	if len(b) < recordHeaderLen {
		if isHTTPPrefix(b) || looksSSLv2(b) {
			return nil // wait for a header's worth to tell
		}
		return refuse(ReasonGarbage, "first byte 0x%02x", b[0])
	}
	if looksSSLv2(b) {
		return refuse(ReasonSSLv2, "SSLv2 ClientHello (version %d.%d)", b[3], b[4])
	}
	if isHTTPPrefix(b[:recordHeaderLen]) {
		return refuse(ReasonHTTP, "%q", b[:recordHeaderLen])
	}
	return refuse(ReasonGarbage, "first bytes % x", b[:recordHeaderLen])
}

// looksSSLv2 tells an SSL 2.0 CLIENT-HELLO: a two-byte record header with
// the high bit set, then message type 1 (RFC 5246 appendix E.2). What has
// arrived of it so far must fit.
func looksSSLv2(b []byte) bool {
	return b[0]&0x80 != 0 && (len(b) < 3 || b[2] == 1)
}

// methods are the request lines an HTTP client may open with, PRI being
// HTTP/2's connection preface (RFC 9113 section 3.4).
var methods = []string{"GET ", "HEAD ", "POST ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ", "TRACE ", "CONNECT ", "PRI "}

// isHTTPPrefix tells whether b begins an HTTP request line.
func isHTTPPrefix(b []byte) bool {
	for _, m := range methods {
		n := min(len(b), len(m))
		if string(b[:n]) == m[:n] {
			return true
		}
	}
	return false
}

func at(b []byte, i int) int {
	if i < len(b) {
		return int(b[i])
	}
	return -1
}

// hello assembles the handshake message from the records' bodies and
// parses it.
func (s *scanner) hello() (*Hello, error) {
	var msg []byte
	if s.records == 1 {
		msg = s.buf[recordHeaderLen:][:s.total]
	} else {
		msg = make([]byte, 0, s.msgLen)
		for off := 0; off < s.off; {
			n := int(s.buf[off+3])<<8 | int(s.buf[off+4])
			msg = append(msg, s.buf[off+recordHeaderLen:off+recordHeaderLen+n]...)
			off += recordHeaderLen + n
		}
		msg = msg[:s.total]
	}
	// Bytes after the message in its last record would be another
	// handshake message before the server's reply. They are the BE's
	// server's to refuse; crypto/tls parses the ClientHello first too.
	h, err := parse(msg)
	if err != nil {
		return nil, err
	}
	h.Raw = s.buf[:s.off:s.off]
	h.Records = s.records
	return h, nil
}

// parse decodes a ClientHello message (type and length included) as RFC
// 8446 section 4.1.2 lays it out, as strictly as crypto/tls does for the
// parts it reads, so that what crypto/tls accepts is accepted here with the
// same server name.
func parse(msg []byte) (*Hello, error) {
	s := cryptobyte.String(msg)
	var (
		h                        Hello
		random, sessionID        []byte
		suites, comp, extensions cryptobyte.String
	)
	if !s.Skip(4) || !s.ReadUint16(&h.Version) || !s.ReadBytes(&random, 32) ||
		!s.ReadUint8LengthPrefixed((*cryptobyte.String)(&sessionID)) ||
		!s.ReadUint16LengthPrefixed(&suites) || len(suites)%2 != 0 ||
		!s.ReadUint8LengthPrefixed(&comp) {
		return nil, refuse(ReasonMalformed, "ClientHello fields")
	}
	if s.Empty() {
		return &h, nil // no extensions (an SSL 3.0-style hello)
	}
	if !s.ReadUint16LengthPrefixed(&extensions) || !s.Empty() {
		return nil, refuse(ReasonMalformed, "ClientHello extensions block")
	}
	var sawSNI, sawALPN, sawVersions bool
	for !extensions.Empty() {
		var typ uint16
		var data cryptobyte.String
		if !extensions.ReadUint16(&typ) || !extensions.ReadUint16LengthPrefixed(&data) {
			return nil, refuse(ReasonMalformed, "extension header")
		}
		var err error
		switch typ {
		case extServerName:
			err = once(&sawSNI, typ)
			if err == nil {
				h.SNI, err = serverName(data)
			}
		case extALPN:
			err = once(&sawALPN, typ)
			if err == nil {
				h.ALPN, err = alpn(data)
			}
		case extSupportedVersions:
			err = once(&sawVersions, typ)
			if err == nil {
				err = versions(data, &h.Version)
			}
		}
		if err != nil {
			return nil, err
		}
	}
	return &h, nil
}

// once refuses a second extension of a type the reader uses: RFC 8446
// section 4.2 allows one of each, and a second server_name could route to
// one BE while the BE's server answers for another name.
func once(seen *bool, typ uint16) error {
	if *seen {
		return refuse(ReasonMalformed, "extension %d twice", typ)
	}
	*seen = true
	return nil
}

// serverName reads a server_name extension (RFC 6066 section 3): the
// host_name, validated and lower-cased, or "" for an IP literal. Other name
// types are skipped, as crypto/tls does.
func serverName(data cryptobyte.String) (string, error) {
	var list cryptobyte.String
	if !data.ReadUint16LengthPrefixed(&list) || list.Empty() || !data.Empty() {
		return "", refuse(ReasonMalformed, "server_name extension")
	}
	var name []byte
	for !list.Empty() {
		var typ uint8
		var n cryptobyte.String
		if !list.ReadUint8(&typ) || !list.ReadUint16LengthPrefixed(&n) || n.Empty() {
			return "", refuse(ReasonMalformed, "server_name entry")
		}
		if typ != nameTypeHostName {
			continue
		}
		if name != nil {
			return "", refuse(ReasonMalformed, "two host_names")
		}
		name = n
	}
	if name == nil {
		return "", nil
	}
	if name[len(name)-1] == '.' {
		// RFC 6066: "without a trailing dot"; crypto/tls refuses it as
		// malformed too.
		return "", refuse(ReasonMalformed, "host_name with a trailing dot")
	}
	if isIPLiteral(name) {
		return "", nil
	}
	if !isDNSName(name) {
		return "", refuse(ReasonBadSNI, "host_name %q", trunc(name))
	}
	return strings.ToLower(string(name)), nil
}

func isIPLiteral(b []byte) bool {
	s := string(b)
	if len(s) > 2 && s[0] == '[' && s[len(s)-1] == ']' {
		s = s[1 : len(s)-1]
	}
	_, err := netip.ParseAddr(s)
	return err == nil
}

// isDNSName tells whether b is a host name routing can match: at most 253
// bytes of dot-separated labels of 1 to 63 letters, digits, hyphens and
// underscores (RFC 1123 section 2.1, plus the underscore that real names
// carry). An internationalised name arrives in its xn-- A-label form (RFC
// 6066 section 3, RFC 5890).
func isDNSName(b []byte) bool {
	if len(b) > 253 {
		return false
	}
	label := 0
	for _, c := range b {
		switch {
		case c == '.':
			if label == 0 {
				return false
			}
			label = 0
			continue
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_':
		default:
			return false
		}
		if label++; label > 63 {
			return false
		}
	}
	return label > 0
}

func trunc(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}

// alpn reads an application_layer_protocol_negotiation extension (RFC 7301
// section 3.1): a non-empty list of non-empty names.
func alpn(data cryptobyte.String) ([]string, error) {
	var list cryptobyte.String
	if !data.ReadUint16LengthPrefixed(&list) || list.Empty() || !data.Empty() {
		return nil, refuse(ReasonMalformed, "ALPN extension")
	}
	var protos []string
	for !list.Empty() {
		var p cryptobyte.String
		if !list.ReadUint8LengthPrefixed(&p) || p.Empty() {
			return nil, refuse(ReasonMalformed, "ALPN protocol name")
		}
		protos = append(protos, string(p))
	}
	return protos, nil
}

// versions reads a ClientHello's supported_versions extension (RFC 8446
// section 4.2.1), which replaces legacy_version, and sets *vers to its
// highest entry, skipping GREASE values (RFC 8701: 0x?a?a).
func versions(data cryptobyte.String, vers *uint16) error {
	var list cryptobyte.String
	if !data.ReadUint8LengthPrefixed(&list) || list.Empty() || len(list)%2 != 0 || !data.Empty() {
		return refuse(ReasonMalformed, "supported_versions extension")
	}
	best := uint16(0)
	for !list.Empty() {
		var v uint16
		list.ReadUint16(&v)
		if v&0x0f0f == 0x0a0a && v>>8 == v&0xff {
			continue
		}
		best = max(best, v)
	}
	if best != 0 {
		*vers = best
	}
	return nil
}
