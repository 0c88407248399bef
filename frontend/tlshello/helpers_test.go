package tlshello

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/crypto/cryptobyte"
)

// fakeConn is a net.Conn whose reads come from r and whose writes are
// kept: enough for crypto/tls to run the first step of a handshake.
type fakeConn struct {
	r       io.Reader
	written bytes.Buffer
}

func (c *fakeConn) Read(b []byte) (int, error)       { return c.r.Read(b) }
func (c *fakeConn) Write(b []byte) (int, error)      { return c.written.Write(b) }
func (c *fakeConn) Close() error                     { return nil }
func (c *fakeConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *fakeConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *fakeConn) SetDeadline(time.Time) error      { return nil }
func (c *fakeConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fakeConn) SetWriteDeadline(time.Time) error { return nil }

// goHello is the ClientHello crypto/tls's client sends with cfg: its first
// write, before it waits for a ServerHello that never comes.
func goHello(t testing.TB, cfg *tls.Config) []byte {
	t.Helper()
	c := &fakeConn{r: bytes.NewReader(nil)}
	if err := tls.Client(c, cfg).Handshake(); err == nil {
		t.Fatal("handshake against nothing succeeded")
	}
	if c.written.Len() == 0 {
		t.Fatal("crypto/tls wrote no ClientHello")
	}
	return c.written.Bytes()
}

var errStop = errors.New("stop after the ClientHello")

// goServerName runs crypto/tls's server over b and reports the server name
// it saw, and whether it parsed a ClientHello at all (its
// GetConfigForClient ran).
func goServerName(b []byte) (name string, parsed bool) {
	cfg := &tls.Config{GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
		name, parsed = chi.ServerName, true
		return nil, errStop
	}}
	tls.Server(&fakeConn{r: bytes.NewReader(b)}, cfg).Handshake()
	return name, parsed
}

// helloSpec describes a ClientHello for build.
type helloSpec struct {
	vers     uint16   // legacy_version; 0 means 0x0303
	names    []string // server_name host_names; nil: no extension
	alpn     []string // nil: no extension
	versions []uint16 // supported_versions; nil: no extension
	keyShare bool     // a TLS 1.3 x25519 key_share and supported_groups
	grease   bool     // GREASE values (RFC 8701) in the suites, groups, versions and as extensions
	pad      int      // a padding extension (RFC 7685) of this many bytes
	extra    [][2][]byte
	noExt    bool // no extensions block at all
}

// build encodes s as a ClientHello handshake message, header included.
func (s helloSpec) build() []byte {
	var b cryptobyte.Builder
	b.AddUint8(typeClientHello)
	b.AddUint24LengthPrefixed(func(b *cryptobyte.Builder) {
		b.AddUint16(cmp(s.vers, 0x0303))
		b.AddBytes(bytes.Repeat([]byte{7}, 32))
		b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(bytes.Repeat([]byte{9}, 32)) })
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			if s.grease {
				b.AddUint16(0x5a5a)
			}
			b.AddUint16(tls.TLS_AES_128_GCM_SHA256)
			b.AddUint16(tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)
		})
		b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddUint8(0) })
		if s.noExt {
			return
		}
		b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
			ext := func(typ uint16, body func(*cryptobyte.Builder)) {
				b.AddUint16(typ)
				b.AddUint16LengthPrefixed(body)
			}
			if s.grease {
				ext(0x0a0a, func(*cryptobyte.Builder) {})
			}
			if s.names != nil {
				ext(extServerName, func(b *cryptobyte.Builder) {
					b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
						for _, n := range s.names {
							b.AddUint8(nameTypeHostName)
							b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(n)) })
						}
					})
				})
			}
			if s.keyShare {
				ext(10, func(b *cryptobyte.Builder) { // supported_groups
					b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
						if s.grease {
							b.AddUint16(0x3a3a)
						}
						b.AddUint16(uint16(tls.X25519))
					})
				})
				ext(51, func(b *cryptobyte.Builder) { // key_share
					b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
						if s.grease {
							b.AddUint16(0x3a3a)
							b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddUint8(0) })
						}
						b.AddUint16(uint16(tls.X25519))
						b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(bytes.Repeat([]byte{1}, 32)) })
					})
				})
			}
			if s.alpn != nil {
				ext(extALPN, func(b *cryptobyte.Builder) {
					b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) {
						for _, p := range s.alpn {
							b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes([]byte(p)) })
						}
					})
				})
			}
			if s.versions != nil {
				ext(extSupportedVersions, func(b *cryptobyte.Builder) {
					b.AddUint8LengthPrefixed(func(b *cryptobyte.Builder) {
						if s.grease {
							b.AddUint16(0x7a7a)
						}
						for _, v := range s.versions {
							b.AddUint16(v)
						}
					})
				})
			}
			for _, e := range s.extra {
				b.AddBytes(e[0])
				b.AddUint16LengthPrefixed(func(b *cryptobyte.Builder) { b.AddBytes(e[1]) })
			}
			if s.grease {
				ext(0x1a1a, func(b *cryptobyte.Builder) { b.AddUint8(0) })
			}
			if s.pad > 0 {
				ext(21, func(b *cryptobyte.Builder) { b.AddBytes(make([]byte, s.pad)) })
			}
		})
	})
	return b.BytesOrPanic()
}

func cmp(v, def uint16) uint16 {
	if v == 0 {
		return def
	}
	return v
}

// records puts a handshake message into TLS records (type 22, version
// 0x0301) with bodies of the given sizes in turn, the last size repeating
// (0 or none: the rest in one record).
func records(msg []byte, sizes ...int) []byte {
	var out []byte
	for i := 0; len(msg) > 0; i++ {
		n := len(msg)
		if len(sizes) > 0 {
			if s := sizes[min(i, len(sizes)-1)]; s > 0 {
				n = min(n, s)
			}
		}
		out = append(out, recordHandshake, 3, 1, byte(n>>8), byte(n))
		out = append(out, msg[:n]...)
		msg = msg[n:]
	}
	return out
}

// segments is a reader that returns its bytes in reads of at most n.
type segments struct {
	b []byte
	n int
}

func (s *segments) Read(p []byte) (int, error) {
	if len(s.b) == 0 {
		return 0, io.EOF
	}
	k := copy(p[:min(len(p), s.n)], s.b)
	s.b = s.b[k:]
	return k, nil
}

// counting counts the bytes read through it.
type counting struct {
	r io.Reader
	n int
}

func (c *counting) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// captures are the ClientHellos in testdata/hello, recorded from real
// clients (see testdata/hello/README).
func captures(t testing.TB) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob("testdata/hello/*.bin")
	if err != nil || len(files) == 0 {
		t.Fatalf("no captures: %v", err)
	}
	m := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		m[filepath.Base(f)] = b
	}
	return m
}
