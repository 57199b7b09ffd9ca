package blockvol

import (
	"sync/atomic"
	"testing"
)

func writeN(t *testing.T, v *Volume, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		if err := v.WriteAt(pattern(uint64(i), 4096), int64(i%64)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
}

// Holds by ID: the lowest one keeps the WAL; releasing one owner's hold
// never drops another's; moving a hold up lets the tail follow.
func TestRetentionHolds(t *testing.T) {
	v, _ := newVol(t, 2<<20, 1<<20)
	v.pauseFlusher.Store(true) // recycling happens only in ReplCheckpoint
	writeN(t, v, 10)
	v.HoldRetention("a", 3)
	v.HoldRetention("b", 6)
	writeN(t, v, 10)
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if got := v.OldestRetainedLSN(); got != 3 {
		t.Fatalf("oldest retained %d with holds a=3 b=6", got)
	}
	if h := v.RetentionHolds(); len(h) != 2 || h["a"] != 3 || h["b"] != 6 {
		t.Fatalf("holds %v", h)
	}
	v.ReleaseRetention("a")
	v.ReleaseRetention("nobody") // no-op
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if got := v.OldestRetainedLSN(); got != 6 {
		t.Fatalf("oldest retained %d after releasing a (b=6 stays)", got)
	}
	v.HoldRetention("b", 15)
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if got := v.OldestRetainedLSN(); got != 15 {
		t.Fatalf("oldest retained %d after moving b to 15", got)
	}
	// A hold moved below the tail keeps what is left, nothing comes back.
	v.HoldRetention("b", 2)
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if got := v.OldestRetainedLSN(); got != 15 {
		t.Fatalf("oldest retained %d after moving b below the tail", got)
	}
	v.ReleaseRetention("b")
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if got, head := v.OldestRetainedLSN(), v.HeadLSN(); got != head+1 {
		t.Fatalf("oldest retained %d with no hold, head %d", got, head)
	}
}

// The callback of SetRetentionFloor is one hold beside the others and
// runs with none of the volume's locks held (it may call back into the
// volume).
func TestRetentionFloorCallbackRunsUnlocked(t *testing.T) {
	v, _ := newVol(t, 2<<20, 1<<20)
	// Only this goroutine's checkpoints run flush cycles: a failed TryLock
	// then means the cycle asking holds flushMu itself.
	v.pauseFlusher.Store(true)
	writeN(t, v, 10)
	var calls, lockedFlush atomic.Int64
	v.SetRetentionFloor(func() (uint64, bool) {
		calls.Add(1)
		if !v.flushMu.TryLock() {
			lockedFlush.Add(1)
		} else {
			v.flushMu.Unlock()
		}
		_ = v.RetentionHolds() // would deadlock under the hold set's lock
		v.HoldRetention("inner", 8)
		return 4, true
	})
	writeN(t, v, 10)
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if calls.Load() == 0 || lockedFlush.Load() != 0 {
		t.Fatalf("callback ran %d times, %d of them under flushMu", calls.Load(), lockedFlush.Load())
	}
	if got := v.OldestRetainedLSN(); got != 4 {
		t.Fatalf("oldest retained %d with the callback at 4 and a hold at 8", got)
	}
	v.SetRetentionFloor(nil)
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if got := v.OldestRetainedLSN(); got != 8 {
		t.Fatalf("oldest retained %d after removing the callback (hold at 8 stays)", got)
	}
}
