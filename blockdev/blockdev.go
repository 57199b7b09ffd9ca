// Package blockdev is the small contract between the frontends (nbd, ublk)
// and whatever stores the bytes (a blockvol.Volume, or a replicated primary
// wrapping one). It holds only types and error values, so every layer can
// import it without importing any other.
package blockdev

import (
	"errors"
	"syscall"
)

// SectorSize is the smallest unit a Device accepts: offsets and lengths of
// every request must be multiples of it. Devices may store data in larger
// blocks (4096 by default) and merge partial blocks internally.
const SectorSize = 512

// MaxIOSize is the largest single read or write a Device must accept.
// The NBD frontend advertises it as the maximum block size.
const MaxIOSize = 32 << 20

// Extent describes one run of a BlockStatus answer.
type Extent struct {
	Offset int64
	Length int64
	// Hole: no storage is allocated for this range (reads return zeroes).
	Hole bool
	// Zero: the range is known to read as zeroes (holes always do).
	Zero bool
}

// Device is what a frontend sees of a volume. All methods are safe for
// concurrent use. A write is visible to every later read once WriteAt
// returns; it is durable once a later Flush returns, or when WriteAt
// returns if fua is set.
type Device interface {
	// Size is the device size in bytes.
	Size() int64
	// BlockSize is the preferred I/O size (4096 for blockd volumes).
	BlockSize() int
	ReadAt(p []byte, off int64) error
	WriteAt(p []byte, off int64, fua bool) error
	// Flush makes every write acknowledged before it durable.
	Flush() error
	// Trim discards the range: reads return zeroes, space is given back.
	Trim(off, length int64) error
	// WriteZeroes makes the range read as zeroes. With punch set the space
	// may be given back (hole punching); without it, allocation is kept.
	WriteZeroes(off, length int64, punch bool) error
	// BlockStatus describes allocation of [off, off+length) as sorted,
	// contiguous extents covering at least the first byte of the range.
	BlockStatus(off, length int64) ([]Extent, error)
}

// Sentinel errors. Implementations wrap them with context (fmt.Errorf
// "...: %w"); frontends map them to protocol error codes with Errno.
var (
	ErrOutOfRange = errors.New("request beyond end of device")
	ErrMisaligned = errors.New("request not aligned to 512-byte sectors")
	ErrInvalid    = errors.New("invalid request")
	ErrTooLarge   = errors.New("request larger than maximum I/O size")
	ErrReadOnly   = errors.New("device is read-only")
	ErrNoSpace    = errors.New("no space left on device")
	ErrIO         = errors.New("I/O error")
	ErrClosed     = errors.New("device is closed")
	// ErrNotPrimary: this server may not accept writes for the volume
	// (no role, no lease, or a stale epoch). Writes and flushes fail.
	ErrNotPrimary = errors.New("not the primary for this volume (no valid lease)")
)

// Errno maps an error from a Device to the errno a block protocol reports.
// Unknown errors are EIO: a failure is never reported as success.
func Errno(err error) syscall.Errno {
	var en syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrOutOfRange), errors.Is(err, ErrMisaligned),
		errors.Is(err, ErrInvalid), errors.Is(err, ErrTooLarge):
		return syscall.EINVAL
	case errors.Is(err, ErrReadOnly), errors.Is(err, ErrNotPrimary):
		return syscall.EPERM
	case errors.Is(err, ErrNoSpace), errors.Is(err, syscall.ENOSPC):
		return syscall.ENOSPC
	case errors.As(err, &en) && en != 0:
		return en
	default:
		return syscall.EIO
	}
}

// CheckRange validates a request against a device of the given size. It
// returns a wrapped sentinel error, or nil when the request is acceptable.
func CheckRange(size, off, length int64, maxLen int64) error {
	switch {
	case length <= 0:
		return ErrInvalid
	case off%SectorSize != 0 || length%SectorSize != 0:
		return ErrMisaligned
	case maxLen > 0 && length > maxLen:
		return ErrTooLarge
	case off < 0 || off > size || length > size-off:
		return ErrOutOfRange
	}
	return nil
}
