package blockvol

import (
	"maps"
	"sync"
)

// retention is the set of holds on the WAL: each names the first LSN its
// owner still needs. The flusher recycles nothing at or above the lowest
// one. Owners (replication: one hold per replica the primary expects
// back, one for the dirty-region bitmaps, one for a replica's unverified
// tail) add, move and release their own holds by ID, so one owner's
// release never drops another's. The set is a leaf: no other lock is
// taken under mu and no caller code runs under it.
type retention struct {
	mu    sync.Mutex
	holds map[string]uint64
	// legacy is the callback of SetRetentionFloor, asked by the flusher
	// before it takes any lock.
	legacy func() (uint64, bool)
}

// HoldRetention adds the hold id, or moves it: while it exists every
// record with LSN >= lsn stays in the WAL. A hold below the oldest
// retained LSN keeps what is still there (recycled records do not come
// back). The owner bounds how long it holds: a hold never expires.
func (v *Volume) HoldRetention(id string, lsn uint64) {
	r := &v.retain
	r.mu.Lock()
	if r.holds == nil {
		r.holds = map[string]uint64{}
	}
	r.holds[id] = lsn
	r.mu.Unlock()
	// No kick: the flusher recycles at its own pace (writers short of
	// space kick it); a hold moves on every barrier answer.
}

// ReleaseRetention removes the hold id (a no-op when there is none).
func (v *Volume) ReleaseRetention(id string) {
	r := &v.retain
	r.mu.Lock()
	delete(r.holds, id)
	r.mu.Unlock()
}

// RetentionHolds returns a copy of the current holds by ID.
func (v *Volume) RetentionHolds() map[string]uint64 {
	r := &v.retain
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.holds)
}

// SetRetentionFloor sets a callback the flusher asks, with no lock of the
// volume held, before each cycle: while it returns ok, records with
// LSN >= lsn stay in the WAL. It is one hold beside those of
// HoldRetention and does not affect them; nil removes it. Prefer
// HoldRetention, which the flusher reads without calling back into its
// owner (the replica side's tail retention still uses this callback).
func (v *Volume) SetRetentionFloor(fn func() (lsn uint64, ok bool)) {
	r := &v.retain
	r.mu.Lock()
	r.legacy = fn
	r.mu.Unlock()
}

// retentionFloor is the lowest LSN any hold needs. Callers hold no lock
// of the volume (the legacy callback runs here).
func (v *Volume) retentionFloor() (lsn uint64, ok bool) {
	r := &v.retain
	r.mu.Lock()
	for _, l := range r.holds {
		if !ok || l < lsn {
			lsn, ok = l, true
		}
	}
	legacy := r.legacy
	r.mu.Unlock()
	if legacy != nil {
		if l, lok := legacy(); lok && (!ok || l < lsn) {
			lsn, ok = l, true
		}
	}
	return lsn, ok
}
