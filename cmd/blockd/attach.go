package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/nbd/kernel"
)

// attach nbd / detach: the kernel NBD client and its keeper (nbd/kernel).
// `attach ublk` lives in the ublk owner's file and adds itself with
// addAttach from its own init (any file order works: attachCmd is a
// package-level variable, initialised before every init runs).

// attachCmd is `blockd attach`; its subcommands are the kinds (nbd, ublk).
var attachCmd = &cli.Command{
	Name:  "attach",
	Usage: "attach a volume as a local block device (nbd, ublk)",
}

// addAttach adds a `blockd attach KIND` subcommand.
func addAttach(c *cli.Command) { attachCmd.Subcommands = append(attachCmd.Subcommands, c) }

func init() {
	register(attachCmd)
	addAttach(&cli.Command{
		Name:      "nbd",
		Usage:     "attach a volume as /dev/nbdN through the kernel nbd driver and keep it connected",
		ArgsUsage: "NAME",
		Description: "Asks the master for the volume's primary, negotiates, hands the sockets to the kernel\n" +
			"over netlink, prints the device path and stays running as the device's keeper:\n" +
			"when the connections die (server restart, failover) it finds the current primary\n" +
			"and reconnects, so a mounted filesystem continues. After --give-up without a\n" +
			"connection it disconnects the device (I/O fails instead of hanging) and exits 1.\n" +
			"SIGINT/SIGTERM (or `blockd detach DEVICE`) disconnect the device and exit 0.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "device", Usage: "use this device (/dev/nbdN); default: a free one"},
			&cli.IntFlag{Name: "connections", Value: 2, Usage: "TCP connections (more than 1 needs the server's CAN_MULTI_CONN)"},
			&cli.StringFlag{Name: "master", Value: api.DefaultMaster, EnvVars: []string{"BLOCKD_MASTER"}, Usage: "master API address(es), comma-separated"},
			&cli.StringFlag{Name: "nbd", Usage: "connect to this NBD address instead of asking the master (no failover)"},
			&cli.DurationFlag{Name: "give-up", Value: 5 * time.Minute, Usage: "give up (fail I/O, exit) after this long without a connection"},
			&cli.DurationFlag{Name: "timeout", Value: 30 * time.Second, Usage: "per-request timeout: an unanswered request marks its connection dead and is retried on a new one"},
			&cli.DurationFlag{Name: "wait", Value: 30 * time.Second, Usage: "keep trying this long for a primary that does not answer yet or refuses the export (a server starting, a failover)"},
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "json: print {\"device\": ...} instead of the bare path"},
			tlsFlags()[0], tlsFlags()[1], tlsFlags()[2],
		},
		Action: attachNBD,
	})
	register(&cli.Command{
		Name:      "detach",
		Usage:     "disconnect an attached device cleanly (/dev/nbdN: stops its keeper; /dev/ublkbN: stops and deletes it)",
		ArgsUsage: "DEVICE",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "force", Usage: "disconnect even while mounted (the filesystem gets I/O errors)"},
			&cli.DurationFlag{Name: "wait", Value: 30 * time.Second, Usage: "how long to wait for the device to be released"},
		},
		Action: func(c *cli.Context) error {
			args := c.Args().Slice()
			if len(args) != 1 {
				return fmt.Errorf("detach: exactly one DEVICE is needed (e.g. /dev/nbd0)")
			}
			ctx, cancel := context.WithTimeout(c.Context, c.Duration("wait"))
			defer cancel()
			detach := kernel.Detach
			if isUblkDevice(args[0]) { // attach_ublk.go
				detach = ublkDetach
			}
			if err := detach(ctx, args[0], c.Bool("force")); err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "detached %s\n", args[0])
			return nil
		},
	})
}

func attachNBD(c *cli.Context) error {
	if c.Args().Len() != 1 {
		return fmt.Errorf("attach nbd: exactly one volume NAME is needed")
	}
	name := c.Args().First()
	if c.String("nbd") == "" { // a volume the master knows: its name follows the rule
		if err := checkVolumeName(name); err != nil {
			return fmt.Errorf("attach nbd: %w", err)
		}
	}
	index := -1
	if dev := c.String("device"); dev != "" {
		i, err := kernel.ParseDevice(dev)
		if err != nil {
			return fmt.Errorf("attach nbd: %w", err)
		}
		index = i
	}
	giveUp := c.Duration("give-up")
	if giveUp <= 0 {
		return fmt.Errorf("attach nbd: --give-up must be positive")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	tcfg, err := nbdTLS(c)
	if err != nil {
		return fmt.Errorf("attach nbd: %w", err)
	}
	resolve, err := primaryResolver(c, name, log, "nbd_primary")
	if err != nil {
		return fmt.Errorf("attach nbd: %w", err)
	}
	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	pol := kernel.DefaultPolicy
	pol.GiveUp = giveUp
	actx, cancel := context.WithTimeout(ctx, c.Duration("wait")+time.Minute)
	stopSpin := waitSpinner("attach nbd "+name+": waiting for its primary", time.Second)
	dev, err := kernel.Attach(actx, kernel.Options{
		Volume:      name,
		Resolve:     resolve,
		Connections: c.Int("connections"),
		Index:       index,
		Timeout:     c.Duration("timeout"),
		Policy:      pol,
		Logger:      log,
		AttachWait:  c.Duration("wait"),
		// The master vouched for the volume: an "unknown export" from its
		// server means "not hosted yet", worth waiting for.
		RetryUnknownExport: c.String("nbd") == "",
		TLS:                tcfg,
	})
	stopSpin()
	cancel()
	if err != nil {
		if errors.Is(err, kernel.ErrNoModule) {
			return fmt.Errorf("%w; on Debian the module comes with the linux-image-* package", err)
		}
		return err
	}
	if c.String("output") == "json" {
		fmt.Printf("{\"device\": %q, \"volume\": %q, \"size_bytes\": %d}\n", dev.Path, name, dev.Export.Size)
	} else {
		fmt.Println(dev.Path)
	}
	return dev.Keep(ctx)
}
