// Command nbdfile serves one plain file over NBD with blockd's nbd package,
// without the volume engine: pread/pwrite on the file, fdatasync for FLUSH
// and FUA, fallocate for TRIM/WRITE_ZEROES, SEEK_DATA/SEEK_HOLE for block
// status. bench/run.sh uses it to measure the protocol layer alone against
// `nbdkit file` on the same file. With -vol DIR it serves a blockvol volume
// instead (created if missing): the engine behind the same nbd layer, for
// profiling without the rest of blockd.
//
//	nbdfile -file disk.img -size 1073741824 -listen 127.0.0.1:10900 [-name vol0] [-cpuprofile f]
//	nbdfile -vol DIR -size 1073741824 -listen ...
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/nbd"
	"golang.org/x/sys/unix"
)

type fileDev struct {
	f    *os.File
	size int64
}

func (d *fileDev) Size() int64    { return d.size }
func (d *fileDev) BlockSize() int { return 4096 }

func (d *fileDev) check(off, n int64) error {
	return blockdev.CheckRange(d.size, off, n, blockdev.MaxIOSize)
}

func (d *fileDev) ReadAt(p []byte, off int64) error {
	if err := d.check(off, int64(len(p))); err != nil {
		return err
	}
	_, err := d.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		err = nil
	}
	return err
}

func (d *fileDev) WriteAt(p []byte, off int64, fua bool) error {
	if err := d.check(off, int64(len(p))); err != nil {
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

func (d *fileDev) Trim(off, n int64) error { return d.WriteZeroes(off, n, true) }

func (d *fileDev) WriteZeroes(off, n int64, punch bool) error {
	if err := blockdev.CheckRange(d.size, off, n, 0); err != nil {
		return err
	}
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if punch {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	return unix.Fallocate(int(d.f.Fd()), mode, off, n)
}

func (d *fileDev) BlockStatus(off, n int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(d.size, off, n, 0); err != nil {
		return nil, err
	}
	fd := int(d.f.Fd())
	var out []blockdev.Extent
	end := off + n
	for pos := off; pos < end; {
		data, err := unix.Seek(fd, pos, unix.SEEK_DATA)
		if err != nil || data >= end {
			// hole to the end (ENXIO: no data after pos)
			out = append(out, blockdev.Extent{Offset: pos, Length: end - pos, Hole: true, Zero: true})
			break
		}
		if data > pos {
			out = append(out, blockdev.Extent{Offset: pos, Length: data - pos, Hole: true, Zero: true})
			pos = data
		}
		hole, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if err != nil || hole > end {
			hole = end
		}
		out = append(out, blockdev.Extent{Offset: pos, Length: hole - pos})
		pos = hole
	}
	return out, nil
}

// nullDev discards writes and reads zeroes.
type nullDev int64

func (d nullDev) Size() int64                               { return int64(d) }
func (d nullDev) BlockSize() int                            { return 4096 }
func (d nullDev) ReadAt(p []byte, off int64) error          { clear(p); return nil }
func (d nullDev) WriteAt(p []byte, off int64, _ bool) error { return nil }
func (d nullDev) Flush() error                              { return nil }
func (d nullDev) Trim(off, n int64) error                   { return nil }
func (d nullDev) WriteZeroes(off, n int64, _ bool) error    { return nil }
func (d nullDev) BlockStatus(off, n int64) ([]blockdev.Extent, error) {
	return []blockdev.Extent{{Offset: off, Length: n, Hole: true, Zero: true}}, nil
}

func main() {
	file := flag.String("file", "", "backing file (created if missing)")
	size := flag.Int64("size", 1<<30, "size in bytes when creating")
	listen := flag.String("listen", "127.0.0.1:10900", "TCP address or unix:PATH")
	name := flag.String("name", "vol0", "export name")
	cpuprof := flag.String("cpuprofile", "", "write a CPU profile until SIGTERM")
	vol := flag.String("vol", "", "serve a blockvol volume in this directory instead of -file")
	null := flag.Bool("null", false, "serve a null device (writes discarded, reads zero): the protocol layer alone, like `nbdkit null`")
	flag.Parse()
	if *null {
		*file = ""
	}
	if err := run(*file, *vol, *size, *listen, *name, *cpuprof); err != nil {
		fmt.Fprintln(os.Stderr, "nbdfile:", err)
		os.Exit(1)
	}
}

func run(file, vol string, size int64, listen, name, cpuprof string) error {
	var dev blockdev.Device
	var closeDev func() error
	if file == "" && vol == "" {
		dev, closeDev = nullDev(size), func() error { return nil }
	} else if vol != "" {
		var v *blockvol.Volume
		var err error
		if blockvol.Exists(vol) {
			v, err = blockvol.Open(vol, blockvol.Options{})
		} else {
			v, err = blockvol.Create(vol, blockvol.Options{Size: size})
		}
		if err != nil {
			return err
		}
		dev, closeDev, file = v, v.Close, vol
	} else {
		f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		st, err := f.Stat()
		if err != nil {
			return err
		}
		if st.Size() == 0 {
			if err := f.Truncate(size); err != nil {
				return err
			}
		} else {
			size = st.Size()
		}
		dev, closeDev = &fileDev{f: f, size: size}, f.Close
	}
	size = dev.Size()
	network, addr := "tcp", listen
	if strings.HasPrefix(listen, "unix:") {
		network, addr = "unix", strings.TrimPrefix(listen, "unix:")
		os.Remove(addr)
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return err
	}
	if cpuprof != "" {
		pf, err := os.Create(cpuprof)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(pf); err != nil {
			return err
		}
		defer func() { pprof.StopCPUProfile(); pf.Close() }()
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	srv := nbd.NewServer(nbd.StaticExports{{Name: name, Device: dev}}, nbd.WithLogger(log))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}()
	fmt.Printf("nbdfile: serving %s (%d bytes) as %q on %s\n", file, size, name, listen)
	if err := srv.Serve(l); !errors.Is(err, nbd.ErrServerClosed) {
		return err
	}
	return closeDev()
}
