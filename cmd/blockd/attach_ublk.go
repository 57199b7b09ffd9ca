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
	"github.com/blockd/blockd/nbd/client"
	"github.com/blockd/blockd/server"
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
// When the volume's primary is a server on this host (found by its control
// socket, see ublk_local.go), attach asks that server to host the device
// itself on the engine (no network hop, no foreground process): it prints
// the path and exits 0. That server recovers the device after it restarts
// (reissue mode, safe because the backend lives in the serving process).

// ublkAttachCommand is `blockd attach ublk`.
var ublkAttachCommand = &cli.Command{
	Name:      "ublk",
	Usage:     "attach a volume as /dev/ublkbN (io_uring based ublk driver) and serve it",
	ArgsUsage: "NAME",
	Description: "When the volume's primary is a volume server on this host (its control socket:\n" +
		"--control, default ./blockd-data/server/control.sock or /var/lib/blockd/control.sock),\n" +
		"that server creates and serves /dev/ublkbN itself (no network hop); attach prints the\n" +
		"path and exits 0, and the device survives restarts of that server (user recovery).\n" +
		"Otherwise it connects to the volume's primary over NBD (asking the master, or --nbd),\n" +
		"creates /dev/ublkbN, prints its path and keeps serving it in the foreground. Lost\n" +
		"connections are re-established to the current primary; after --give-up without one,\n" +
		"I/O fails. Needs root and the ublk_drv module (tested on Linux 6.12).",
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
		&cli.StringFlag{Name: "control", EnvVars: []string{"BLOCKD_CONTROL"}, Usage: "control socket of a local volume server (default: ./blockd-data/server/control.sock, /var/lib/blockd/control.sock); none: always serve over NBD in the foreground"},
		tlsFlags()[0], tlsFlags()[1], tlsFlags()[2],
	},
	Action: attachUblk,
}

func init() { addAttach(ublkAttachCommand) }

func attachUblk(c *cli.Context) error {
	if c.Args().Len() != 1 {
		return fmt.Errorf("attach ublk: exactly one volume NAME is needed")
	}
	name := c.Args().First()
	if c.String("nbd") == "" { // a volume the master knows: its name follows the rule
		if err := checkVolumeName(name); err != nil {
			return fmt.Errorf("attach ublk: %w", err)
		}
		if _, err := masterAddrs(c.String("master")); err != nil {
			return fmt.Errorf("attach ublk: %w", err)
		}
	}
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
	// The local path: a server on this host that is the primary hosts
	// the device. --nbd and --recover (a foreground device's takeover) ask
	// for the foreground mode.
	if c.String("nbd") == "" && !c.Bool("recover") {
		path, handled, err := attachUblkLocal(c, name, log)
		if handled {
			if err != nil {
				return fmt.Errorf("attach ublk: %w", err)
			}
			if c.String("output") == "json" {
				fmt.Printf("{\"device\": %q, \"volume\": %q, \"hosted_by\": \"server\"}\n", path, name)
			} else {
				fmt.Println(path)
			}
			return nil
		}
	}
	resolve, err := primaryResolver(c, name, log, "ublk_primary")
	if err != nil {
		return fmt.Errorf("attach ublk: %w", err)
	}
	ctx, stop := signal.NotifyContext(c.Context, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)

	actx, cancel := context.WithTimeout(ctx, c.Duration("wait")+time.Minute)
	tcfg, err := nbdTLS(c)
	if err != nil {
		cancel()
		return fmt.Errorf("attach ublk: %w", err)
	}
	dev, err := client.Dial(actx, client.Options{Export: name, Resolve: resolve, GiveUp: c.Duration("give-up"), Wait: c.Duration("wait"), TLS: tcfg, Logger: log})
	if err != nil {
		cancel()
		return fmt.Errorf("attach ublk: %w", err)
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
		log.Info("ublk_detach", "device", d.Path(), "reason", "signal")
		return d.Delete()
	case <-usr1:
		log.Info("ublk_release", "device", d.Path(), "hint", fmt.Sprintf("blockd attach ublk %s --id %d --recover", name, d.ID()))
		return d.Release()
	case <-d.Done():
		// Stopped from outside (blockd detach): it deletes the device.
		log.Info("ublk_detached", "device", d.Path(), "io_errors", d.IOErrors())
		return nil
	}
}

// isUblkDevice reports whether a `blockd detach` argument names a ublk
// device (/dev/ublkbN).
func isUblkDevice(path string) bool { return strings.HasPrefix(path, "/dev/ublkb") }

// ublkDetach is `blockd detach /dev/ublkbN`: STOP_DEV (the serving
// process's queues end and it exits), then DEL_DEV, which returns once that
// process has let go. A mounted device is refused unless force is set.
// A device hosted by a local volume server is removed through that
// server's control socket (so it forgets the device and does not recover
// it after a restart).
func ublkDetach(ctx context.Context, path string, force bool) error {
	id, err := ublk.ParsePath(path)
	if err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	if ok, err := ublkDetachHosted(ctx, id, force); ok {
		if err != nil {
			return fmt.Errorf("detach: %s: %w", path, err)
		}
		return nil
	}
	if err := ublk.Detach(ctx, id, force); err != nil {
		if errors.Is(err, ublk.ErrNoDevice) {
			return fmt.Errorf("detach: %s: no such ublk device", path)
		}
		return fmt.Errorf("detach: %w", err)
	}
	return nil
}

// attachUblkLocal asks a volume server on this host to host the device
// when it is the volume's primary. handled is false when there is no such
// server (no control socket answers, or the master names another primary):
// the caller then serves the device over NBD.
func attachUblkLocal(c *cli.Context, name string, log *slog.Logger) (path string, handled bool, err error) {
	ctx := c.Context
	cc, serverID, err := localServer(ctx, c.String("control"))
	if cc == nil {
		if err != nil && c.String("control") != "" {
			log.Info("ublk_local_unavailable", "control", c.String("control"), "err", err)
		}
		return "", false, nil
	}
	deadline := time.Now().Add(c.Duration("wait"))
	mc, err := apiClient(c, api.ParseAddrs(c.String("master")))
	if err != nil {
		return "", true, err
	}
	mc.RetryFor = 10 * time.Second
	for {
		p, perr := mc.PrimaryOf(ctx, name)
		switch {
		case perr == nil && p.ServerID != serverID:
			log.Info("ublk_local_not_primary", "volume", name, "local_server", serverID, "primary", p.ServerID, "fallback", "nbd")
			return "", false, nil
		case perr != nil && api.IsCode(perr, api.CodeNotFound):
			return "", true, fmt.Errorf("unknown volume %s: %w", api.QuoteName(name), perr)
		case perr != nil:
			// No answer from the master: the local server decides.
			log.Info("ublk_local_master_unavailable", "volume", name, "err", perr)
		}
		req := server.UblkRequest{Volume: name}
		if id := c.Int("id"); id >= 0 {
			req.ID = &id
		}
		var d server.UblkDevice
		d, err = cc.AttachUblk(ctx, req)
		if err == nil {
			log.Info("ublk_local_attached", "volume", name, "server", serverID, "device", d.Path, "control", cc.Socket())
			return d.Path, true, nil
		}
		code := server.ControlCode(err)
		retry := code == "not_primary" || code == "not_found" || code == "busy"
		if !retry || time.Now().After(deadline) || ctx.Err() != nil {
			if perr != nil && (code == "not_primary" || code == "not_found") {
				// The master is unreachable and the local server is not
				// the primary: the NBD path asks the master again.
				return "", false, nil
			}
			return "", true, err
		}
		log.Info("ublk_local_retry", "volume", name, "err", err)
		select {
		case <-ctx.Done():
			return "", true, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}
