package relay

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"time"

	"tcpha/backends"
)

// Check sends the web server at addr the check's request and judges its
// status line (backends.Check.Judge): a BE whose server answers 500, or
// 404 to the check's path, cannot serve. It takes at most timeout.
func Check(ctx context.Context, addr string, check backends.Check, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp4", addr)
	if err != nil {
		return fmt.Errorf("web server %s: %w", addr, err)
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		c.SetDeadline(d)
	}
	if _, err := io.WriteString(c, check.Request()); err != nil {
		return fmt.Errorf("web server %s: %w", addr, err)
	}
	line, err := bufio.NewReaderSize(c, 256).ReadString('\n')
	if err != nil {
		return fmt.Errorf("web server %s: no answer: %w", addr, err)
	}
	if err := check.Judge(line); err != nil {
		return fmt.Errorf("web server %s: %w", addr, err)
	}
	return nil
}
