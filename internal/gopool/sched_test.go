package gopool

import "runtime"

func runtimeGosched() { runtime.Gosched() }
