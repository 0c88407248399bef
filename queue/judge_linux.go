package queue

import (
	"context"
	"fmt"
	"log/slog"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
)

// OpenJudge is Open for a queue whose verdicts may replace the packet:
// judge returns the verdict and, to accept a changed packet (a segment
// cut at a request held for another BE), its new bytes. The whole packet
// is copied to the agent, since the payload is what is judged.
func OpenJudge(num uint16, log *slog.Logger, judge func([]byte) (Verdict, []byte)) (*Reader, error) {
	nf, err := nfqueue.Open(&nfqueue.Config{
		NfQueue:      num,
		MaxPacketLen: 0xffff,
		MaxQueueLen:  4096,
		Copymode:     nfqueue.NfQnlCopyPacket,
	})
	if err != nil {
		return nil, fmt.Errorf("open NFQUEUE %d: %w", num, err)
	}
	if err := nf.SetOption(netlink.NoENOBUFS, true); err != nil {
		log.Debug("NFQUEUE: NoENOBUFS not set", "op", "queue", "err", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Reader{nf: nf, num: num, log: log, cancel: cancel}
	hook := func(a nfqueue.Attribute) int {
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
			err = nf.SetVerdictModPacket(*a.PacketID, nfqueue.NfAccept, repl)
		case v == Accept:
			err = nf.SetVerdict(*a.PacketID, nfqueue.NfAccept)
		default:
			err = nf.SetVerdict(*a.PacketID, nfqueue.NfDrop)
		}
		if err != nil {
			log.Warn("NFQUEUE verdict", "op", "queue", "err", err)
		}
		return 0
	}
	if err := nf.RegisterWithErrorFunc(ctx, hook, r.onErr(ctx)); err != nil {
		cancel()
		nf.Close()
		return nil, fmt.Errorf("bind NFQUEUE %d: %w", num, err)
	}
	return r, nil
}
