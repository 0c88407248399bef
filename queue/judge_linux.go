package queue

import "log/slog"

// OpenJudge is Open for a queue whose verdicts may replace the packet:
// judge returns the verdict and, to accept a changed packet (a segment
// cut at a request held for another BE), its new bytes. The whole packet
// is copied to the agent, since the payload is what is judged.
func OpenJudge(num uint16, log *slog.Logger, judge func([]byte) (Verdict, []byte)) (*Reader, error) {
	return open(num, 0xffff, log, judge)
}
