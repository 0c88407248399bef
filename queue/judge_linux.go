package queue

import (
	"log/slog"

	nfqueue "github.com/florianl/go-nfqueue/v2"
)

// OpenJudge is Open for a queue whose verdicts may replace the packet:
// judge returns the verdict and, to accept a changed packet (a segment
// cut at a request held for another BE), its new bytes. The whole packet
// is copied to the agent, since the payload is what is judged.
func OpenJudge(num uint16, log *slog.Logger, judge func([]byte) (Verdict, []byte)) (*Reader, error) {
	return open(num, 0xffff, log, func(r *Reader) nfqueue.HookFunc {
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
				log.Warn("NFQUEUE verdict", "op", "queue", "err", err)
			}
			return 0
		}
	})
}
