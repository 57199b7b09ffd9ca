package ublk

import (
	"fmt"
	"syscall"

	"github.com/blockd/blockd/blockdev"
)

// execute runs one ublk request against the device and returns the value
// committed to the driver: the byte count for READ and WRITE (the driver
// treats a short count as a partial completion and requeues the rest), 0
// for the other operations, or a negative errno. A failure is never turned
// into success: unknown operations get -EOPNOTSUPP, device errors go through
// blockdev.Errno (unknown errors become -EIO) and a panic in the device is
// caught and reported as -EIO.
func execute(dev blockdev.Device, d ioDesc, buf []byte) (res int32, err error) {
	defer func() {
		if p := recover(); p != nil {
			res, err = -int32(syscall.EIO), fmt.Errorf("ublk: device panicked on op %d: %v", d.op(), p)
		}
	}()
	off := int64(d.startSector) * blockdev.SectorSize
	n := int64(d.nrSectors) * blockdev.SectorSize
	switch d.op() {
	case opRead, opWrite:
		if n <= 0 || n > int64(len(buf)) {
			return -int32(syscall.EINVAL), fmt.Errorf("ublk: %d-byte request exceeds the %d-byte buffer", n, len(buf))
		}
		if d.op() == opRead {
			err = dev.ReadAt(buf[:n], off)
		} else {
			err = dev.WriteAt(buf[:n], off, d.flags()&ioFlagFUA != 0)
		}
		if err == nil {
			return int32(n), nil
		}
	case opFlush:
		err = dev.Flush()
	case opDiscard:
		err = dev.Trim(off, n)
	case opWriteZeroes:
		err = dev.WriteZeroes(off, n, d.flags()&ioFlagNoUnmap == 0)
	default:
		return -int32(syscall.EOPNOTSUPP), fmt.Errorf("ublk: unsupported op %d", d.op())
	}
	if err != nil {
		return -int32(blockdev.Errno(err)), err
	}
	return 0, nil
}

func opName(op uint8) string {
	switch op {
	case opRead:
		return "read"
	case opWrite:
		return "write"
	case opFlush:
		return "flush"
	case opDiscard:
		return "discard"
	case opWriteZeroes:
		return "write_zeroes"
	case opWriteSame:
		return "write_same"
	}
	return fmt.Sprintf("op%d", op)
}
