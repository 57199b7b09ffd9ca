package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/ublk"
)

// `blockd attach ublk NAME` and the ublk half of `blockd detach`.
//
// The process that runs `attach ublk` serves /dev/ublkbN for as long as the
// device exists (ublk has no kernel-side socket to hand over, unlike nbd):
// it reaches the volume's primary over NBD (following failovers through the
// master, like attach nbd) and stays in the foreground. SIGINT/SIGTERM or
// `blockd detach /dev/ublkbN` remove the device; SIGUSR1 releases it for a
// restarted `attach ublk --recover N` (the device and a mounted filesystem
// stay while no process serves it; I/O waits).
//
// When the volume's primary runs in the same process, the server should
// call ublk.Serve on the engine directly instead (no network hop); that is
// wiring for the server/serve command.

// ublkAttachCommand is `blockd attach ublk`.
var ublkAttachCommand = &cli.Command{
	Name:      "ublk",
	Usage:     "attach a volume as /dev/ublkbN (io_uring based ublk driver) and serve it",
	ArgsUsage: "NAME",
	Description: "Connects to the volume's primary over NBD (asking the master, or --nbd), creates\n" +
		"/dev/ublkbN, prints its path and keeps serving it in the foreground. Lost connections\n" +
		"are re-established to the current primary; after --give-up without one, I/O fails.\n" +
		"Needs root and the ublk_drv module (tested on Linux 6.12).",
	Flags: []cli.Flag{
		&cli.StringFlag{Name: "master", Value: api.DefaultMaster, EnvVars: []string{"BLOCKD_MASTER"}, Usage: "master API address(es), comma-separated"},
		&cli.StringFlag{Name: "nbd", Usage: "use this NBD address instead of asking the master (no failover)"},
		&cli.IntFlag{Name: "id", Value: ublk.AutoID, Usage: "device number N of /dev/ublkbN (-1: the driver chooses)"},
		&cli.BoolFlag{Name: "recover", Usage: "take over the existing device --id whose serving process exited (user recovery)"},
		&cli.StringFlag{Name: "recovery", Value: "fail", Usage: "what a crash of this process does to requests in flight: fail (EIO; safe over the network) or reissue (replayed by the next process)"},
		&cli.IntFlag{Name: "queues", Usage: "hardware queues (default: CPUs, at most 4)"},
		&cli.IntFlag{Name: "depth", Usage: "requests in flight per queue (default 64)"},
		&cli.DurationFlag{Name: "wait", Value: 30 * time.Second, Usage: "keep trying this long for a volume or primary that is not ready yet (a server starting, a failover)"},
		&cli.DurationFlag{Name: "give-up", Value: 5 * time.Minute, Usage: "fail I/O after this long without a connection to the primary"},
		&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "json: print {\"device\": ...} instead of the bare path"},
	},
	Action: attachUblk,
}

func init() { addAttach(ublkAttachCommand) }

func attachUblk(c *cli.Context) error {
	if err := interspersedFlags(c); err != nil {
		return fmt.Errorf("attach ublk: %w", err)
	}
	if len(argsOf(c)) != 1 {
		return fmt.Errorf("attach ublk: exactly one volume NAME is needed")
	}
	name := argsOf(c)[0]
	// Fail early and clearly when the kernel side is missing.
	if _, err := ublk.Features(); err != nil {
		return fmt.Errorf("attach ublk: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	var mode ublk.RecoveryMode
	switch c.String("recovery") {
	case "fail":
		// Over the network a write of a crashed server can still be queued
		// at the primary; replaying it could land after a newer write.
		mode = ublk.RecoveryFail
	case "reissue":
		mode = ublk.RecoveryReissue
	default:
		return fmt.Errorf("attach ublk: --recovery must be fail or reissue")
	}
	var resolve func(ctx context.Context) (string, error)
	if addr := c.String("nbd"); addr != "" {
		resolve = func(context.Context) (string, error) { return addr, nil }
	} else {
		mc := api.NewClient(api.ParseAddrs(c.String("master")))
		mc.RetryFor = 10 * time.Second
		resolve = func(ctx context.Context) (string, error) {
			p, err := mc.PrimaryOf(ctx, name)
			if err != nil {
				if api.IsCode(err, api.CodeNotFound) {
					return "", fmt.Errorf("unknown volume %q: %w", name, err)
				}
				return "", err
			}
			if p.NBDAddr == "" {
				return "", fmt.Errorf("volume %q: primary %s has no NBD address", name, p.ServerID)
			}
			log.Info("ublk.primary", "volume", name, "server", p.ServerID, "nbd_addr", p.NBDAddr, "epoch", p.Epoch)
			return p.NBDAddr, nil
		}
	}
	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)

	actx, cancel := context.WithTimeout(ctx, c.Duration("wait")+time.Minute)
	var dev *nbdDevice
	for deadline := time.Now().Add(c.Duration("wait")); ; {
		var err error
		dctx, dcancel := context.WithTimeout(actx, 15*time.Second)
		dev, err = dialNBDDevice(dctx, name, resolve, c.Duration("give-up"), log)
		dcancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) || actx.Err() != nil {
			cancel()
			return fmt.Errorf("attach ublk: %w", err)
		}
		log.Info("ublk.attach.retry", "volume", name, "err", err)
		select {
		case <-actx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
	defer dev.Close()
	d, err := ublk.Serve(actx, dev, ublk.Options{
		Queues:   c.Int("queues"),
		Depth:    c.Int("depth"),
		DevID:    c.Int("id"),
		Recover:  c.Bool("recover"),
		Recovery: mode,
		Logger:   log,
	})
	cancel()
	if err != nil {
		return fmt.Errorf("attach ublk: %w", err)
	}
	if c.String("output") == "json" {
		fmt.Printf("{\"device\": %q, \"volume\": %q, \"size_bytes\": %d}\n", d.Path(), name, dev.Size())
	} else {
		fmt.Println(d.Path())
	}
	select {
	case <-ctx.Done():
		log.Info("ublk.detach", "device", d.Path(), "reason", "signal")
		return d.Delete()
	case <-usr1:
		log.Info("ublk.release", "device", d.Path(), "hint", fmt.Sprintf("blockd attach ublk %s --id %d --recover", name, d.ID()))
		return d.Release()
	case <-d.Done():
		// Stopped from outside (blockd detach): it deletes the device.
		log.Info("ublk.detached", "device", d.Path(), "io_errors", d.IOErrors())
		return nil
	}
}

// isUblkDevice reports whether a `blockd detach` argument names a ublk
// device (/dev/ublkbN).
func isUblkDevice(path string) bool { return strings.HasPrefix(path, "/dev/ublkb") }

// ublkDetach is `blockd detach /dev/ublkbN`: STOP_DEV (the serving
// process's queues end and it exits), then DEL_DEV, which returns once that
// process has let go. A mounted device is refused unless force is set.
func ublkDetach(ctx context.Context, path string, force bool) error {
	id, err := ublk.ParsePath(path)
	if err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	if err := ublk.Detach(ctx, id, force); err != nil {
		if errors.Is(err, ublk.ErrNoDevice) {
			return fmt.Errorf("detach: %s: no such ublk device", path)
		}
		return fmt.Errorf("detach: %w", err)
	}
	return nil
}
