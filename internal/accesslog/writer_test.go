package accesslog

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

func lines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// TestWriterFlushesWithinASecond: a buffered line reaches the file within
// FlushAfter, with no further line to push it.
func TestWriterFlushesWithinASecond(t *testing.T) {
	path := filepath.Join(t.TempDir(), "access.log")
	synctest.Test(t, func(t *testing.T) {
		w, err := Open(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		w.Log(Entry{Role: BE, Target: "/a"})
		if b, _ := os.ReadFile(path); len(b) != 0 {
			t.Fatalf("written at once: %q (the buffer is for load)", b)
		}
		time.Sleep(FlushAfter + time.Millisecond)
		synctest.Wait()
		if got := lines(t, path); len(got) != 1 || !strings.Contains(got[0], `"/a"`) {
			t.Fatalf("after %v: %q", FlushAfter, got)
		}
	})
}

// TestWriterReopen: after the file is renamed (logrotate) and Reopen, the
// lines before it are in the old file and the ones after in the new.
func TestWriterReopen(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "access.log")
	w, err := Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	w.Log(Entry{Role: BE, Target: "/before"})
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := w.Reopen(); err != nil {
		t.Fatal(err)
	}
	w.Log(Entry{Role: BE, Target: "/after"})
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	w.Log(Entry{Role: BE, Target: "/closed"}) // nothing, no panic
	if got := lines(t, path+".1"); len(got) != 1 || !strings.Contains(got[0], `"/before"`) {
		t.Errorf("old file: %q", got)
	}
	if got := lines(t, path); len(got) != 1 || !strings.Contains(got[0], `"/after"`) {
		t.Errorf("new file: %q", got)
	}
}

// TestWriterConcurrent: lines from many goroutines, beyond the buffer,
// all arrive whole.
func TestWriterConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "access.log")
	w, err := Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	long := "/" + strings.Repeat("x", 2*bufSize) // one line larger than the buffer
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 500 {
				target := "/n"
				if g == 0 && i == 250 {
					target = long
				}
				w.Log(Entry{Role: BE, Target: target, Status: 200})
			}
		})
	}
	wg.Wait()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	got := lines(t, path)
	if len(got) != 8*500 {
		t.Fatalf("%d lines, want %d", len(got), 8*500)
	}
	for _, l := range got {
		if len(Split(l)) != Fields {
			t.Fatalf("torn line %q", l[:min(len(l), 200)])
		}
	}
}

// BenchmarkLog compares a write(2) per line under a mutex (the simplest
// writer) with the buffered Writer, from parallel goroutines.
func BenchmarkLog(b *testing.B) {
	e := Entry{Time: time.Now(), Role: BE, Host: "www.example", Method: "GET", Target: "/static/img/0001.jpg",
		Status: 200, Bytes: 1024, Served: Here, BE: "10.0.0.11", Total: time.Millisecond}
	b.Run("write-per-line", func(b *testing.B) {
		f, err := os.OpenFile(filepath.Join(b.TempDir(), "a.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		var mu sync.Mutex
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				var tmp [256]byte
				line := AppendLine(tmp[:0], e)
				mu.Lock()
				f.Write(line)
				mu.Unlock()
			}
		})
	})
	b.Run("buffered", func(b *testing.B) {
		w, err := Open(filepath.Join(b.TempDir(), "a.log"), nil)
		if err != nil {
			b.Fatal(err)
		}
		defer w.Close()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				w.Log(e)
			}
		})
	})
}
