package blockvol

import (
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
