// Command filenbd is a minimal NBD server for kernel VM tests: blockd's nbd
// package serving one file-backed export. Flush and FUA are fdatasync, so
// data a client synced survives a kill -9 of this process. It stands in for
// `blockd serve` where a test needs only an NBD server.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/nbd"
)

type fileDev struct {
	f    *os.File
	size int64
}

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
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
func (d *fileDev) WriteZeroes(off, n int64, punch bool) error {
	// tmpfs has no ZERO_RANGE; a punched hole reads as zeroes too.
	return unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}
func (d *fileDev) BlockStatus(off, n int64) ([]blockdev.Extent, error) {
	return []blockdev.Extent{{Offset: off, Length: n}}, nil
}

func main() {
	file := flag.String("file", "", "backing file (created if missing)")
	size := flag.Int64("size", 256<<20, "size in bytes when creating")
	listen := flag.String("listen", "127.0.0.1:10809", "listen address")
	name := flag.String("name", "vol0", "export name")
	flag.Parse()
	f, err := os.OpenFile(*file, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, "filenbd:", err)
		os.Exit(1)
	}
	fi, _ := f.Stat()
	if fi.Size() == 0 {
		if err := f.Truncate(*size); err != nil {
			fmt.Fprintln(os.Stderr, "filenbd:", err)
			os.Exit(1)
		}
		fi, _ = f.Stat()
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "filenbd:", err)
		os.Exit(1)
	}
	s := nbd.NewServer(nbd.StaticExports{{Name: *name, Device: &fileDev{f: f, size: fi.Size()}}},
		nbd.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))))
	fmt.Printf("filenbd: serving %s (%d bytes) as %q on %s\n", *file, fi.Size(), *name, *listen)
	if err := s.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, "filenbd:", err)
		os.Exit(1)
	}
}
