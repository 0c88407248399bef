package gopool

import (
	"sync"
	"testing"
)

func TestPoolRunsEverythingAndKeepsWorkers(t *testing.T) {
	p := New(4)
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := 0
	for range 1000 {
		wg.Add(1)
		p.Go(func() {
			defer wg.Done()
			mu.Lock()
			seen++
			mu.Unlock()
		})
	}
	wg.Wait()
	if seen != 1000 {
		t.Fatalf("ran %d of 1000", seen)
	}
	for i := 0; p.Idle() == 0 && i < 1000; i++ {
		runtimeGosched()
	}
	if n := p.Idle(); n < 1 || n > 4 {
		t.Errorf("%d idle workers, want 1 to 4", n)
	}
	// Work given to an idle worker runs.
	done := make(chan struct{})
	p.Go(func() { close(done) })
	<-done
}
