// Package testlog holds what the tests of several packages use to read what
// an agent logged while it runs.
package testlog

import (
	"bytes"
	"sync"
)

// Buffer is an io.Writer that goroutines may write while a test reads it.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String returns everything written so far.
func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
