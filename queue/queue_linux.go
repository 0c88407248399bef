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
	nf     *nfqueue.Nfqueue
	num    uint16
	log    *slog.Logger
	cancel context.CancelFunc
	once   sync.Once
}

// Open binds queue num and feeds its packets to decide, which runs on the
// reader goroutine and must not block. The bind happens here, so a queue
// another process holds fails Open, before the caller changes anything.
func Open(num uint16, log *slog.Logger, decide func([]byte) (Verdict, Reason)) (*Reader, error) {
	// Headers are enough: the verdict never needs the payload.
	return open(num, 128, log, func(p []byte) (Verdict, []byte) {
		v, _ := decide(p)
		return v, nil
	})
}

// open binds queue num, copying up to maxLen bytes of each packet, and
// gives each packet's verdict by judge (hook).
func open(num uint16, maxLen uint32, log *slog.Logger, judge func([]byte) (Verdict, []byte)) (*Reader, error) {
	nf, err := nfqueue.Open(&nfqueue.Config{
		NfQueue:      num,
		MaxPacketLen: maxLen,
		MaxQueueLen:  4096,
		Copymode:     nfqueue.NfQnlCopyPacket,
	})
	if err != nil {
		return nil, fmt.Errorf("open NFQUEUE %d: %w", num, err)
	}
	// ENOBUFS when the kernel outruns the reader is not fatal (FACTS.md).
	if err := nf.SetOption(netlink.NoENOBUFS, true); err != nil {
		log.Debug("NFQUEUE: NoENOBUFS not set", "op", "queue", "err", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Reader{nf: nf, num: num, log: log, cancel: cancel}
	if err := nf.RegisterWithErrorFunc(ctx, r.hook(judge), r.onErr(ctx)); err != nil {
		cancel()
		nf.Close()
		return nil, fmt.Errorf("bind NFQUEUE %d: %w", num, err)
	}
	return r, nil
}

// hook hands each packet to judge and gives its verdict: accept, with the
// packet's new bytes when judge returns them, or drop.
func (r *Reader) hook(judge func([]byte) (Verdict, []byte)) nfqueue.HookFunc {
	return func(a nfqueue.Attribute) int {
		if a.PacketID == nil {
			return 0
		}
		var payload []byte
		if a.Payload != nil {
			payload = *a.Payload
		}
		v, repl := judge(payload)
		var err error
		switch {
		case v == Accept && repl != nil:
			err = r.nf.SetVerdictModPacket(*a.PacketID, nfqueue.NfAccept, repl)
		case v == Accept:
			err = r.nf.SetVerdict(*a.PacketID, nfqueue.NfAccept)
		default:
			err = r.nf.SetVerdict(*a.PacketID, nfqueue.NfDrop)
		}
		if err != nil {
			r.log.Warn("NFQUEUE verdict", "op", "queue", "err", err)
		}
		return 0
	}
}

func (r *Reader) onErr(ctx context.Context) nfqueue.ErrorFunc {
	return func(err error) int {
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
}

// Close unbinds the queue. It is idempotent.
func (r *Reader) Close() error {
	var err error
	r.once.Do(func() {
		r.cancel()
		err = r.nf.Close()
	})
	return err
}
