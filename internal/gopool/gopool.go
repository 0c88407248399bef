// Package gopool runs short-lived work on goroutines that outlive it. A
// new goroutine starts with a small stack and grows it, copying, as its
// first connection's calls go deep; a worker that already served one keeps
// its grown stack for the next. The agents run one connection per
// goroutine, thousands a second: runtime.newstack was 4-6 % of their CPU
// (docs/performance.md).
package gopool

import "sync/atomic"

// Pool hands work to idle workers, starting one when none is idle. At most
// MaxIdle workers wait for work; the rest exit when done.
type Pool struct {
	MaxIdle int
	work    chan func()
	idle    atomic.Int64
}

// New returns a pool that keeps up to maxIdle idle workers.
func New(maxIdle int) *Pool {
	return &Pool{MaxIdle: maxIdle, work: make(chan func())}
}

// Go runs fn on an idle worker, or on a new one.
func (p *Pool) Go(fn func()) {
	select {
	case p.work <- fn:
	default:
		go p.worker(fn)
	}
}

func (p *Pool) worker(fn func()) {
	for {
		fn()
		if p.idle.Add(1) > int64(p.MaxIdle) {
			p.idle.Add(-1)
			return
		}
		fn = <-p.work
		p.idle.Add(-1)
	}
}

// Idle returns how many workers wait for work.
func (p *Pool) Idle() int { return int(p.idle.Load()) }
