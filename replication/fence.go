package replication

import (
	"errors"
	"fmt"
)

// Fencing errors: no result outlives its authority.
var (
	ErrStaleEpoch   = errors.New("replication: stale epoch")
	ErrStaleSession = errors.New("replication: stale session")
	ErrNoServerID   = errors.New("replication: replica has no server ID (fail closed)")
	// ErrWrongPrimary: a session from a server the replica's assignment
	// does not name as the volume's primary.
	ErrWrongPrimary = errors.New("replication: not the assigned primary")
)

// Fence is the authority a message must carry: the current epoch and the
// current session. Zero session means "no session yet".
type Fence struct {
	Epoch   uint64
	Session uint64
}

// Check refuses a message from another epoch or session. Epoch is checked
// first, so a message from an old primary is reported as stale_epoch.
func (f Fence) Check(epoch, session uint64) error {
	if epoch != f.Epoch {
		return fmt.Errorf("%w: message epoch %d, current %d", ErrStaleEpoch, epoch, f.Epoch)
	}
	if session != f.Session {
		return fmt.Errorf("%w: message session %d, current %d", ErrStaleSession, session, f.Session)
	}
	return nil
}
