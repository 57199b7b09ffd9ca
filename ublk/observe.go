package ublk

// Counters for monitoring, read with (*Device).Stats; the package imports
// no monitoring library.

import (
	"sync/atomic"
	"syscall"
)

// errnoSlots are the errnos counted by name; the last slot is "other".
var errnoSlots = [...]syscall.Errno{syscall.EPERM, syscall.EIO, syscall.ENOMEM, syscall.EINVAL, syscall.ENOSPC,
	syscall.EOVERFLOW, syscall.EOPNOTSUPP, syscall.ESHUTDOWN, syscall.ENODEV}

var errnoNames = [...]string{"EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN", "ENODEV", "other"}

// Stats is a snapshot of a device's counters.
type Stats struct {
	// InFlight: requests taken from the kernel and not yet completed.
	InFlight int64
	// Errors counts requests completed with an error, by errno name.
	Errors map[string]uint64
}

type devStats struct {
	inFlight atomic.Int64
	errs     [len(errnoNames)]atomic.Uint64
}

func (s *devStats) countError(res int32) {
	e := syscall.Errno(-res)
	for i, x := range errnoSlots {
		if x == e {
			s.errs[i].Add(1)
			return
		}
	}
	s.errs[len(errnoSlots)].Add(1)
}

// Stats reads the counters.
func (d *Device) Stats() Stats {
	out := Stats{InFlight: max(d.stats.inFlight.Load(), 0), Errors: make(map[string]uint64, len(errnoNames))}
	for i, n := range errnoNames {
		out.Errors[n] = d.stats.errs[i].Load()
	}
	return out
}
