package main

import (
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/csi"
)

// `blockd csi`: the Kubernetes CSI driver (package csi).
func init() {
	register(&cli.Command{
		Name:  "csi",
		Usage: "run the CSI driver (identity, controller and/or node services) on a unix socket",
		Description: "Serves CSI spec v1 over gRPC at --endpoint. The controller creates, deletes and expands\n" +
			"volumes through the master; the node attaches them over NBD (the keeper runs in this\n" +
			"process, so a mounted volume follows failovers), makes ext4/xfs on a blank device and\n" +
			"mounts it. The node needs root and the nbd kernel module. SIGINT/SIGTERM stop it;\n" +
			"devices it attached stay connected (pods keep their I/O), without reconnects until\n" +
			"they are unstaged and staged again. Snapshots and clones go to the volume's primary's\n" +
			"admin API (servers need --http). In a TLS cluster give --tls-cert/--tls-key/--tls-ca\n" +
			"(a client certificate, blockd tls init --client NAME): the master, the admin API and\n" +
			"the NBD connections all use them.",
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "endpoint", Value: "unix:///csi/csi.sock", EnvVars: []string{"CSI_ENDPOINT"}, Usage: "gRPC endpoint (unix:///path)"},
			&cli.StringFlag{Name: "node-id", EnvVars: []string{"NODE_ID"}, Usage: "this node's ID (required in node and both modes)"},
			&cli.StringFlag{Name: "master", Value: api.DefaultMaster, EnvVars: []string{"BLOCKD_MASTER"}, Usage: "master API address(es), comma-separated"},
			&cli.StringFlag{Name: "mode", Value: csi.ModeBoth, Usage: "controller, node or both"},
			&cli.IntFlag{Name: "connections", Value: 1, Usage: "NBD connections per attached device"},
			&cli.DurationFlag{Name: "attach-wait", Value: time.Minute, Usage: "how long staging waits for a volume's primary to serve it"},
			&cli.DurationFlag{Name: "give-up", Value: 5 * time.Minute, Usage: "a device without a connection this long fails its I/O"},
			&cli.BoolFlag{Name: "debug", Usage: "log every call"},
		}, tlsFlags()...),
		Action: func(c *cli.Context) error {
			if c.Args().Len() > 0 {
				return fmt.Errorf("csi: unexpected arguments %v", c.Args().Slice())
			}
			level := slog.LevelInfo
			if c.Bool("debug") {
				level = slog.LevelDebug
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			creds, err := loadTLS(c)
			if err != nil {
				return fmt.Errorf("csi: %w", err)
			}
			drv, err := csi.New(csi.Config{
				Endpoint: c.String("endpoint"), NodeID: c.String("node-id"), Mode: c.String("mode"),
				Masters: api.ParseAddrs(c.String("master")), NBDConnections: c.Int("connections"),
				AttachWait: c.Duration("attach-wait"), GiveUp: c.Duration("give-up"), Logger: log,
				TLS: creds,
			})
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return drv.Run(ctx)
		},
	})
}
