// Package transplant hands a rebuilt client connection to a web server's
// own socket (`deliver = socket`, issue 15): it dials the server over
// loopback, finds the server process's fd for the accepted end, hides it
// from the server's epoll, disconnects it in repair mode (no packet),
// rebuilds the client connection onto it with TCP_REPAIR, and gives it back
// to the server's epoll, which wakes the server with the queued request.
// The recipe and its traps are in ../shared/FACTS.md, "Handing a rebuilt
// connection to the web server's own socket"; docs/design.md says what the
// server must allow.
//
// This file and fdinfo.go are pure; transplant_linux.go is the kernel
// adapter.
package transplant

import (
	"errors"
	"fmt"
)

// Reason says why a connection could not be handed to the server. Its
// String is a metric label: the caller falls back to the relay and counts
// the reason.
type Reason uint8

const (
	ReasonDial        Reason = iota + 1 // dialing the server failed
	ReasonNotAccepted                   // the server did not accept the dial in time
	ReasonNoWorker                      // no process holds the server's listening socket
	ReasonNotInEpoll                    // no worker's epoll watches the accepted socket
	ReasonDenied                        // pidfd_open/pidfd_getfd refused (ptrace access, Yama)
	ReasonWorkerGone                    // the worker exited (a reload)
	ReasonFDChanged                     // the worker's fd no longer is the idle connection
	ReasonThread                        // the surgery thread could not get its own fd table
	ReasonEpollDel                      // hiding the socket from the server's epoll failed
	ReasonRepair                        // repair mode or the repair-mode disconnect failed
	ReasonRestore                       // rebuilding the client connection on the socket failed
	ReasonEpollAdd                      // giving the socket back to the server's epoll failed
	ReasonDeferred                      // the listener defers accept until data (`listen … deferred`)
)

var reasonNames = [...]string{
	ReasonDial:        "dial",
	ReasonNotAccepted: "not_accepted",
	ReasonNoWorker:    "no_worker",
	ReasonNotInEpoll:  "not_in_epoll",
	ReasonDenied:      "denied",
	ReasonWorkerGone:  "worker_gone",
	ReasonFDChanged:   "fd_changed",
	ReasonThread:      "thread",
	ReasonEpollDel:    "epoll_del",
	ReasonRepair:      "repair",
	ReasonRestore:     "restore",
	ReasonEpollAdd:    "epoll_add",
	ReasonDeferred:    "deferred",
}

func (r Reason) String() string {
	if int(r) < len(reasonNames) && reasonNames[r] != "" {
		return reasonNames[r]
	}
	return fmt.Sprintf("reason_%d", uint8(r))
}

// Reasons lists every reason, for registering metric labels up front.
func Reasons() []Reason {
	var rs []Reason
	for r := range reasonNames {
		if reasonNames[r] != "" {
			rs = append(rs, Reason(r))
		}
	}
	return rs
}

// ServerConn says what a failure left of the server's idle connection. In
// every case the client's connection is untouched (nothing was sent to the
// client) and the caller's ConnInfo can still be restored elsewhere, e.g.
// by the relay.
type ServerConn uint8

const (
	// ServerIntact: the failure came before the repair-mode disconnect; the
	// server's connection is as it was, back in its epoll, and the idle
	// connection may be used again or closed.
	ServerIntact ServerConn = iota
	// ServerClosed: the server's socket was disconnected (state CLOSE, no
	// packet sent) and given back to the server, which reads an error and
	// closes it; the idle connection is spent.
	ServerClosed
)

func (s ServerConn) String() string {
	if s == ServerIntact {
		return "intact"
	}
	return "closed"
}

// Error is a failed preparation or transplant.
type Error struct {
	Reason Reason
	Server ServerConn
	Err    error
}

func (e *Error) Error() string {
	return fmt.Sprintf("transplant: %s (server connection %s): %v", e.Reason, e.Server, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// ReasonOf returns the reason of a failure from this package, 0 for
// anything else.
func ReasonOf(err error) Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return 0
}
