package accesslog

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
)

// FlushAfter bounds how long a line waits in the Writer's buffer.
const FlushAfter = time.Second

// bufSize is the Writer's buffer: about 400 lines of 150 bytes. A line that
// would not fit flushes the buffer first, so every write(2) holds whole
// lines: two agents appending to one file during an upgrade (O_APPEND)
// never interleave within a line.
const bufSize = 64 << 10

// Writer is an access log file: goroutine-safe, buffered (a line waits at
// most FlushAfter), and reopened at its path on Reopen, after logrotate
// moved it. Under load a line per request costs a copy, not a syscall
// (docs/performance.md, "Access log").
type Writer struct {
	path string
	// onError hears of a failed write of buffered lines (a full disk);
	// the lines are dropped, the requests go on.
	onError func(error)

	mu     sync.Mutex
	f      *os.File
	buf    []byte
	timer  *time.Timer // armed while buf holds lines
	closed bool
}

// Open opens (creating, appending) the access log at path; onError, if
// not nil, hears of writes that failed.
func Open(path string, onError func(error)) (*Writer, error) {
	f, err := openFile(path)
	if err != nil {
		return nil, err
	}
	w := &Writer{path: path, onError: onError, f: f, buf: make([]byte, 0, bufSize)}
	w.timer = time.AfterFunc(time.Hour, func() {
		if err := w.Flush(); err != nil && w.onError != nil {
			w.onError(err)
		}
	})
	w.timer.Stop()
	return w, nil
}

func openFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open accesslog: %w", err)
	}
	return f, nil
}

// Log writes e's line. After Close it does nothing.
func (w *Writer) Log(e Entry) {
	var tmp [256]byte
	line := AppendLine(tmp[:0], e)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return
	}
	if len(w.buf)+len(line) > cap(w.buf) {
		w.report(w.flushLocked())
	}
	if len(line) > cap(w.buf) {
		w.report(w.write(line))
		return
	}
	if len(w.buf) == 0 {
		w.timer.Reset(FlushAfter)
	}
	w.buf = append(w.buf, line...)
}

// Flush writes the buffered lines out.
func (w *Writer) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	return w.flushLocked()
}

func (w *Writer) flushLocked() error {
	if len(w.buf) == 0 {
		return nil
	}
	err := w.write(w.buf)
	w.buf = w.buf[:0]
	w.timer.Stop()
	return err
}

func (w *Writer) write(b []byte) error {
	if _, err := w.f.Write(b); err != nil {
		return fmt.Errorf("write accesslog %s: %w", w.path, err)
	}
	return nil
}

func (w *Writer) report(err error) {
	if err != nil && w.onError != nil {
		w.onError(err)
	}
}

// Reopen flushes what is buffered to the file the Writer had, then opens
// its path again (SIGHUP, after logrotate moved the file).
func (w *Writer) Reopen() error {
	f, err := openFile(w.path)
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		f.Close()
		return nil
	}
	ferr := w.flushLocked()
	old := w.f
	w.f = f
	return errors.Join(ferr, old.Close())
}

// Close flushes and closes the file; it may be called more than once, and
// Log does nothing after it.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	err := w.flushLocked()
	w.closed = true
	w.timer.Stop()
	if cerr := w.f.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("close accesslog %s: %w", w.path, cerr))
	}
	return err
}

// Recorder keeps entries in memory, in order: a sink for tests of the
// code that logs. It is safe for concurrent use.
type Recorder struct {
	mu sync.Mutex
	es []Entry
}

// Log appends e.
func (r *Recorder) Log(e Entry) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.es = append(r.es, e)
}

// Entries returns a copy of the entries logged so far.
func (r *Recorder) Entries() []Entry {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Entry(nil), r.es...)
}
