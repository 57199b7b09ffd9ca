package replication

import "fmt"

// ReplicaState is the primary's view of one replica (docs/ARCHITECTURE.md §4.5).
type ReplicaState int

const (
	Disconnected ReplicaState = iota
	Connecting
	CatchingUp
	InSync
	Degraded
	NeedsRebuild
	Rebuilding
)

var stateNames = [...]string{"disconnected", "connecting", "catching_up", "in_sync", "degraded", "needs_rebuild", "rebuilding"}

func (s ReplicaState) String() string {
	if s >= 0 && int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", int(s))
}

// CountsForBarrier: only an InSync replica's FlushedLSN counts.
func (s ReplicaState) CountsForBarrier() bool { return s == InSync }

// transitions lists the legal moves of the state machine. Any state may
// fall back to Disconnected/Degraded (connection lost) or NeedsRebuild
// (escalation); the forward path is
// Disconnected → Connecting → (CatchingUp | Rebuilding) → InSync.
var transitions = map[ReplicaState][]ReplicaState{
	Disconnected: {Connecting, NeedsRebuild},
	Connecting:   {CatchingUp, Rebuilding, InSync, Degraded, Disconnected, NeedsRebuild},
	CatchingUp:   {InSync, Degraded, Disconnected, NeedsRebuild, Rebuilding},
	InSync:       {Degraded, Disconnected, CatchingUp, NeedsRebuild},
	Degraded:     {Connecting, Disconnected, NeedsRebuild},
	NeedsRebuild: {Connecting, Rebuilding, Disconnected},
	Rebuilding:   {InSync, Degraded, Disconnected, NeedsRebuild},
}

// CanTransition reports whether from → to is a legal move.
func CanTransition(from, to ReplicaState) bool {
	if from == to {
		return true
	}
	for _, s := range transitions[from] {
		if s == to {
			return true
		}
	}
	return false
}
