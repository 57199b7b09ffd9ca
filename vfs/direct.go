package vfs

import (
	"errors"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DirectWriter is implemented by files that can write around the page
// cache (O_DIRECT). WriteAtDirect has WriteAt's meaning and durability (the
// data is not durable before Sync: the device may cache it); it reports
// ErrNoDirect, having written nothing, when the file, the buffer or the
// range cannot take a direct write, and the caller then uses WriteAt.
//
// Why: a large write copied into the page cache costs the server a memory
// copy of every byte (a third of blockd's CPU under 1 MiB writes); a direct
// write hands the buffer to the device.
type DirectWriter interface {
	WriteAtDirect(p []byte, off int64) (int, error)
}

// ErrNoDirect: a direct write is not possible here (see DirectWriter).
var ErrNoDirect = errors.New("vfs: direct write not possible")

// DirectAlign is the alignment of buffer address, offset and length a
// direct write needs (the largest logical block size in common use).
const DirectAlign = 4096

// direct is an osFile's second descriptor, opened with O_DIRECT on first
// use. A filesystem without O_DIRECT (tmpfs) refuses the open; the file
// then never tries again.
type direct struct {
	once sync.Once
	f    *os.File // nil: not possible
}

// Aligned reports whether p, off and len(p) suit a direct write.
func Aligned(p []byte, off int64) bool {
	return len(p) > 0 && len(p)%DirectAlign == 0 && off%DirectAlign == 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(p)))%DirectAlign == 0
}

func (o *osFile) WriteAtDirect(p []byte, off int64) (int, error) {
	if !Aligned(p, off) {
		return 0, ErrNoDirect
	}
	o.direct.once.Do(func() {
		f, err := os.OpenFile(o.f.Name(), os.O_WRONLY|unix.O_DIRECT, 0)
		if err == nil {
			o.direct.f = f
		}
	})
	f := o.direct.f
	if f == nil {
		return 0, ErrNoDirect
	}
	n, err := f.WriteAt(p, off)
	if n == 0 && errors.Is(err, unix.EINVAL) {
		return 0, ErrNoDirect // alignment the device wants is larger
	}
	return n, err
}

func (o *osFile) closeDirect() error {
	if o.direct.f == nil {
		return nil
	}
	return o.direct.f.Close()
}
