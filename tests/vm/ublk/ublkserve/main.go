// Command ublkserve is the static program the ublk VM tests run inside the
// guest: it serves one backing store as /dev/ublkbN through package ublk
// and, optionally, the same store over NBD (for side-by-side benchmarks and
// for checking both frontends see the same bytes).
//
//	ublkserve --file /tmp/vol.img --size 256M [--id N] [--recover] [--nbd 127.0.0.1:10809]
//
// It prints "ublk-ready PATH" once the device is up (and writes PATH to
// --ready if given). SIGTERM stops and deletes the device; SIGUSR1 releases
// it for a later --recover (planned restart); SIGKILL is a crash, which
// user recovery also survives. When the device is stopped by someone else
// (blockd detach) it exits 0.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/ublk"
	"golang.org/x/sys/unix"
)

func main() {
	file := flag.String("file", "", "backing file (a plain file)")
	walS := flag.String("wal", "64M", "WAL size when creating an engine volume")
	engine := flag.String("engine", "", "backing blockvol volume directory (the real engine; created with --size if absent)")
	sizeS := flag.String("size", "256M", "size when creating the backing file (K/M/G suffixes)")
	id := flag.Int("id", ublk.AutoID, "ublk device number (-1: driver chooses)")
	recov := flag.Bool("recover", false, "take over the existing device --id through user recovery")
	queues := flag.Int("queues", 0, "hardware queues (0: default)")
	depth := flag.Int("depth", 0, "queue depth (0: default)")
	mode := flag.String("recovery", "reissue", "recovery mode for a new device: reissue, fail, none")
	nbdAddr := flag.String("nbd", "", "also serve the backing store over NBD on this address (export vol0)")
	ready := flag.String("ready", "", "write the device path to this file when ready")
	verbose := flag.Bool("v", false, "debug logging")
	detach := flag.String("detach", "", "detach this /dev/ublkbN (as blockd detach does) and exit")
	force := flag.Bool("force", false, "with --detach: even when mounted")
	uid := flag.Int("uid", -1, "switch to this uid/gid before creating the device (privilege checks)")
	flag.Parse()
	if *uid >= 0 {
		err := syscall.Setgid(*uid)
		if err == nil {
			err = syscall.Setuid(*uid)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "ublkserve: setuid %d: %v\n", *uid, err)
			os.Exit(2)
		}
	}
	if *detach != "" {
		id, err := ublk.ParsePath(*detach)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			err = ublk.Detach(ctx, id, *force)
			cancel()
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "ublkserve: %v\n", err)
			os.Exit(1)
		}
		fmt.Printf("detached %s\n", *detach)
		return
	}
	lvl := slog.LevelInfo
	if *verbose {
		lvl = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	if err := run(log, *file, *engine, *walS, *sizeS, *id, *recov, *queues, *depth, *mode, *nbdAddr, *ready); err != nil {
		fmt.Fprintf(os.Stderr, "ublkserve: %v\n", err)
		os.Exit(1)
	}
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mult, s = 1<<10, strings.TrimSuffix(s, "K")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	}
	n, err := strconv.ParseInt(s, 10, 64)
	return n * mult, err
}

func run(log *slog.Logger, file, engine, walS, sizeS string, id int, recov bool, queues, depth int, mode, nbdAddr, ready string) error {
	size, err := parseSize(sizeS)
	if err != nil {
		return fmt.Errorf("--size: %w", err)
	}
	wal, err := parseSize(walS)
	if err != nil {
		return fmt.Errorf("--wal: %w", err)
	}
	var dev interface {
		blockdev.Device
		Close() error
	}
	switch {
	case engine != "" && blockvol.Exists(engine):
		dev, err = blockvol.Open(engine, blockvol.Options{Logger: log})
	case engine != "":
		dev, err = blockvol.Create(engine, blockvol.Options{Size: size, WALSize: wal, Logger: log})
	case file != "":
		dev, err = openFileDev(file, size)
	default:
		return errors.New("--file or --engine is required")
	}
	if err != nil {
		return err
	}
	defer func() {
		if err := dev.Close(); err != nil {
			log.Error("ublkserve_close", "err", err)
		}
	}()
	o := ublk.Options{Queues: queues, Depth: depth, DevID: id, Recover: recov, Logger: log}
	switch os.Getenv("UBLK_INLINE") {
	case "auto":
		o.Inline = ublk.InlineAuto
	case "always":
		o.Inline = ublk.InlineAlways
	}
	switch mode {
	case "reissue":
		o.Recovery = ublk.RecoveryReissue
	case "fail":
		o.Recovery = ublk.RecoveryFail
	case "none":
		o.Recovery = ublk.RecoveryNone
	default:
		return fmt.Errorf("--recovery %q", mode)
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1)
	if nbdAddr != "" {
		l, err := net.Listen("tcp", nbdAddr)
		if err != nil {
			return err
		}
		srv := nbd.NewServer(nbd.StaticExports{{Name: "vol0", Device: dev}}, nbd.WithLogger(log))
		go srv.Serve(l)
	}
	d, err := ublk.Serve(context.Background(), dev, o)
	if err != nil {
		return err
	}
	fmt.Printf("ublk-ready %s\n", d.Path())
	if ready != "" {
		if err := os.WriteFile(ready, []byte(d.Path()+"\n"), 0o644); err != nil {
			return err
		}
	}
	select {
	case s := <-sigs:
		if s == syscall.SIGUSR1 {
			err := d.Release()
			log.Info("ublkserve_released", "err", err)
			return err
		}
		err := d.Delete()
		log.Info("ublkserve_deleted", "err", err)
		return err
	case <-d.Done():
		log.Info("ublkserve_device_gone", "io_errors", d.IOErrors())
		return nil
	}
}

// fileDev is a blockdev.Device over a plain file: the simplest backing
// store with real durability calls (fdatasync, hole punching).
type fileDev struct {
	f    *os.File
	size int64
}

func openFileDev(path string, size int64) (*fileDev, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if fi.Size() == 0 {
		if err := f.Truncate(size); err != nil {
			return nil, err
		}
	} else {
		size = fi.Size()
	}
	return &fileDev{f: f, size: size}, nil
}

func (d *fileDev) Close() error   { return d.f.Close() }
func (d *fileDev) Size() int64    { return d.size }
func (d *fileDev) BlockSize() int { return 4096 }

func (d *fileDev) ReadAt(p []byte, off int64) error {
	if err := blockdev.CheckRange(d.size, off, int64(len(p)), blockdev.MaxIOSize); err != nil {
		return err
	}
	_, err := d.f.ReadAt(p, off)
	return err
}

func (d *fileDev) WriteAt(p []byte, off int64, fua bool) error {
	if err := blockdev.CheckRange(d.size, off, int64(len(p)), blockdev.MaxIOSize); err != nil {
		return err
	}
	if _, err := d.f.WriteAt(p, off); err != nil {
		return err
	}
	if fua {
		return unix.Fdatasync(int(d.f.Fd()))
	}
	return nil
}

func (d *fileDev) Flush() error { return unix.Fdatasync(int(d.f.Fd())) }

func (d *fileDev) Trim(off, n int64) error {
	if err := blockdev.CheckRange(d.size, off, n, 0); err != nil {
		return err
	}
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

func (d *fileDev) WriteZeroes(off, n int64, punch bool) error {
	if err := blockdev.CheckRange(d.size, off, n, 0); err != nil {
		return err
	}
	fd := int(d.f.Fd())
	if !punch {
		err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if err != unix.EOPNOTSUPP {
			return err
		}
		// tmpfs has no ZERO_RANGE: punch, then allocate again.
		if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
			return err
		}
		return unix.Fallocate(fd, unix.FALLOC_FL_KEEP_SIZE, off, n)
	}
	return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

func (d *fileDev) BlockStatus(off, n int64) ([]blockdev.Extent, error) {
	return []blockdev.Extent{{Offset: off, Length: n}}, nil
}
