package queue

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Reader binds one NFQUEUE queue number and hands each packet to a
// decision function. It owns its netlink socket; only one socket per
// network namespace may bind a queue number (FACTS.md).
type Reader struct {
	nf   *nfqueue.Nfqueue
	num  uint16
	log  *slog.Logger
	once sync.Once
}

// Open binds queue num.
func Open(num uint16, log *slog.Logger) (*Reader, error) {
	nf, err := nfqueue.Open(&nfqueue.Config{
		NfQueue:      num,
		MaxPacketLen: 128, // headers are enough: the verdict never needs the payload
		MaxQueueLen:  4096,
		Copymode:     nfqueue.NfQnlCopyPacket,
		// FailOpen off: a packet the queue cannot hold is dropped, which is
		// right here because the rule forwarded a copy before queueing.
		Logger: nil,
	})
	if err != nil {
		return nil, fmt.Errorf("open NFQUEUE %d: %w", num, err)
	}
	// ENOBUFS when the kernel outruns the reader is not fatal (FACTS.md);
	// asking for no ENOBUFS reports keeps the socket quiet about it.
	if err := nf.SetOption(netlink.NoENOBUFS, true); err != nil {
		log.Debug("NFQUEUE: NoENOBUFS not set", "op", "queue", "err", err)
	}
	return &Reader{nf: nf, num: num, log: log}, nil
}

// Run feeds queued packets to decide until ctx is done. decide runs on the
// reader goroutine and must not block.
func (r *Reader) Run(ctx context.Context, decide func([]byte) (Verdict, Reason)) error {
	hook := func(a nfqueue.Attribute) int {
		if a.PacketID == nil {
			return 0
		}
		var payload []byte
		if a.Payload != nil {
			payload = *a.Payload
		}
		v, _ := decide(payload)
		verdict := nfqueue.NfDrop
		if v == Accept {
			verdict = nfqueue.NfAccept
		}
		if err := r.nf.SetVerdict(*a.PacketID, verdict); err != nil {
			r.log.Warn("NFQUEUE verdict", "op", "queue", "err", err)
		}
		return 0
	}
	onErr := func(err error) int {
		if ctx.Err() != nil {
			return 1
		}
		var oe *netlink.OpError
		if errors.Is(err, unix.ENOBUFS) || (errors.As(err, &oe) && errors.Is(oe.Err, unix.ENOBUFS)) {
			r.log.Debug("NFQUEUE ENOBUFS: the kernel dropped queued packets", "op", "queue")
			return 0
		}
		r.log.Warn("NFQUEUE read", "op", "queue", "err", err)
		return 0
	}
	if err := r.nf.RegisterWithErrorFunc(ctx, hook, onErr); err != nil {
		return fmt.Errorf("NFQUEUE %d: register: %w", r.num, err)
	}
	<-ctx.Done()
	return nil
}

// Close releases the queue. It is idempotent.
func (r *Reader) Close() error {
	var err error
	r.once.Do(func() { err = r.nf.Close() })
	return err
}
