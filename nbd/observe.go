package nbd

// Counters for monitoring, read with (*Server).Stats. They cost nothing on
// the success path: connections and in-flight requests are counted from
// the live connection table when Stats is called, errors when an error
// reply is sent. The package imports no monitoring library.

import (
	"sync/atomic"

	"github.com/blockd/blockd/nbd/wire"
)

// ErrnoNames are the errno values an NBD reply may carry, by name (the
// keys of Stats.Errors).
var ErrnoNames = map[uint32]string{
	wire.ErrnoPerm: "EPERM", wire.ErrnoIO: "EIO", wire.ErrnoNoMem: "ENOMEM", wire.ErrnoInval: "EINVAL",
	wire.ErrnoNoSpc: "ENOSPC", wire.ErrnoOverflow: "EOVERFLOW", wire.ErrnoNotSup: "ENOTSUP", wire.ErrnoShutdown: "ESHUTDOWN",
}

// Stats is a snapshot of a server's counters.
type Stats struct {
	// Connections open (negotiating or transmitting) and requests read
	// and not yet answered, now.
	Connections, InFlight int64
	// Accepted counts connections served since start.
	Accepted uint64
	// Errors counts error replies by errno name (ErrnoNames; "other").
	Errors map[string]uint64
}

type serverStats struct {
	accepted atomic.Uint64
	errs     [9]atomic.Uint64 // errnoSlot order; last: other
}

var errnoSlots = [...]uint32{wire.ErrnoPerm, wire.ErrnoIO, wire.ErrnoNoMem, wire.ErrnoInval, wire.ErrnoNoSpc,
	wire.ErrnoOverflow, wire.ErrnoNotSup, wire.ErrnoShutdown}

func (st *serverStats) countError(errno uint32) {
	for i, e := range errnoSlots {
		if e == errno {
			st.errs[i].Add(1)
			return
		}
	}
	st.errs[len(errnoSlots)].Add(1)
}

// Stats reads the counters.
func (s *Server) Stats() Stats {
	out := Stats{Accepted: s.stats.accepted.Load(), Errors: make(map[string]uint64, len(errnoSlots)+1)}
	s.mu.Lock()
	out.Connections = int64(len(s.conns))
	for c := range s.conns {
		out.InFlight += int64(max(c.out.busy.Load(), 0))
	}
	s.mu.Unlock()
	for i, e := range errnoSlots {
		out.Errors[ErrnoNames[e]] = s.stats.errs[i].Load()
	}
	out.Errors["other"] = s.stats.errs[len(errnoSlots)].Load()
	return out
}
