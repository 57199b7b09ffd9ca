package replication

import (
	"fmt"
	"time"
)

// CatchUpBudget bounds catch-up: after MaxAttempts failed attempts, or
// when one catch-up runs longer than MaxDuration or streams more than
// MaxBytes, it escalates (bounded replay, explicit escalation: docs/ARCHITECTURE.md §4.4).
type CatchUpBudget struct {
	MaxAttempts int
	MaxDuration time.Duration
	MaxBytes    int64
}

// DefaultCatchUpBudget: 3 attempts, 2 minutes, 4 GiB.
var DefaultCatchUpBudget = CatchUpBudget{MaxAttempts: 3, MaxDuration: 2 * time.Minute, MaxBytes: 4 << 30}

// CatchUpVerdict says whether to keep trying. failedAttempts counts failed
// attempts so far; elapsed and bytes describe the current attempt.
func (b CatchUpBudget) Verdict(failedAttempts int, elapsed time.Duration, bytes int64) (escalate bool, reason string) {
	switch {
	case b.MaxAttempts > 0 && failedAttempts >= b.MaxAttempts:
		return true, fmt.Sprintf("catchup_attempts_exhausted: %d failed attempts (max %d)", failedAttempts, b.MaxAttempts)
	case b.MaxDuration > 0 && elapsed > b.MaxDuration:
		return true, fmt.Sprintf("catchup_time_budget: %s > %s", elapsed.Round(time.Millisecond), b.MaxDuration)
	case b.MaxBytes > 0 && bytes > b.MaxBytes:
		return true, fmt.Sprintf("catchup_byte_budget: %d bytes > %d", bytes, b.MaxBytes)
	}
	return false, ""
}

// RetentionBudget bounds how long and how much WAL the primary keeps for a
// replica that is not keeping up. Past it the hold is released and the
// replica escalated (to a bitmap resync or a rebuild).
type RetentionBudget struct {
	MaxAge   time.Duration
	MaxBytes int64
}

// DefaultRetentionBudget: 5 minutes, 256 MiB of WAL.
var DefaultRetentionBudget = RetentionBudget{MaxAge: 5 * time.Minute, MaxBytes: 256 << 20}

// Hold is one replica's claim on the primary's WAL.
type Hold struct {
	ID         string
	FromLSN    uint64    // first LSN the replica still needs
	Since      time.Time // when the replica stopped being InSync (zero: it is InSync)
	BytesAhead int64     // WAL bytes written since FromLSN
}

// Exceeded reports whether a hold is past the budget, with the reason.
func (b RetentionBudget) Exceeded(h Hold, now time.Time) (bool, string) {
	if b.MaxAge > 0 && !h.Since.IsZero() && now.Sub(h.Since) > b.MaxAge {
		return true, fmt.Sprintf("retention_time_budget: away %s > %s, needs LSN %d", now.Sub(h.Since).Round(time.Millisecond), b.MaxAge, h.FromLSN)
	}
	if b.MaxBytes > 0 && h.BytesAhead > b.MaxBytes {
		return true, fmt.Sprintf("retention_byte_budget: %d WAL bytes since LSN %d > %d", h.BytesAhead, h.FromLSN, b.MaxBytes)
	}
	return false, ""
}

// RetentionFloor is the lowest LSN any hold still needs; ok is false when
// there is no hold.
func RetentionFloor(holds []Hold) (lsn uint64, ok bool) {
	for _, h := range holds {
		if !ok || h.FromLSN < lsn {
			lsn, ok = h.FromLSN, true
		}
	}
	return lsn, ok
}
