package relay

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// Check asks the web server at addr for its home page's head (HEAD /) and
// returns nil when it answers with any HTTP status: a BE whose server
// answers, even 404, can serve (seed 4.9's "work status"). It takes at
// most timeout.
func Check(ctx context.Context, addr string, timeout time.Duration) error {
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
	if _, err := io.WriteString(c, "HEAD / HTTP/1.0\r\nHost: localhost\r\nUser-Agent: tcpha-check\r\n\r\n"); err != nil {
		return fmt.Errorf("web server %s: %w", addr, err)
	}
	line, err := bufio.NewReaderSize(c, 256).ReadString('\n')
	if err != nil {
		return fmt.Errorf("web server %s: no answer: %w", addr, err)
	}
	if !strings.HasPrefix(line, "HTTP/1.") {
		return fmt.Errorf("web server %s: answered %q, not HTTP", addr, strings.TrimSpace(line))
	}
	return nil
}
