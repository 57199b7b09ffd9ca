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

// retentionFloor is the lowest LSN any hold needs. It reads the hold set
// only: no owner's code runs here, so the flusher asks it under its own
// locks without calling into replication.
func (v *Volume) retentionFloor() (lsn uint64, ok bool) {
	r := &v.retain
	r.mu.Lock()
	for _, l := range r.holds {
		if !ok || l < lsn {
			lsn, ok = l, true
		}
	}
	r.mu.Unlock()
	return lsn, ok
}
