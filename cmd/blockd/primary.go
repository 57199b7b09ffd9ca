package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/urfave/cli/v2"
)

// primaryResolver tells an attach keeper where the volume's primary is
// now: the fixed --nbd address, or the master's current record (asked
// again after every failover). event names the log line for the answer.
func primaryResolver(c *cli.Context, name string, log *slog.Logger, event string) (func(context.Context) (string, error), error) {
	if addr := c.String("nbd"); addr != "" {
		return func(context.Context) (string, error) { return addr, nil }, nil
	}
	addrs, err := masterAddrs(c.String("master"))
	if err != nil {
		return nil, err
	}
	mc, err := apiClient(c, addrs)
	if err != nil {
		return nil, err
	}
	mc.RetryFor = 10 * time.Second
	mc.AnswerTimeout = defaultAnswerTimeout
	return func(ctx context.Context) (string, error) {
		p, err := mc.PrimaryNBD(ctx, name)
		if err != nil {
			return "", err
		}
		log.Info(event, "volume", name, "server", p.ServerID, "nbd_addr", p.NBDAddr, "epoch", p.Epoch)
		return p.NBDAddr, nil
	}, nil
}
