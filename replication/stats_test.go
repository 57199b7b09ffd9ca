package replication

import "testing"

// TestProgressGauge: a base transfer reports bytes of the whole, a
// catch-up LSNs (and never overrides a base transfer in flight), clear
// ends it.
func TestProgressGauge(t *testing.T) {
	var g progressGauge
	if g.snapshot() != nil {
		t.Fatal("progress before any transfer")
	}
	g.startBase(TransferRebuild, 0, 10, 1<<20, 9<<20+512) // the last region is short
	g.setBase(4, 1<<20)
	p := g.snapshot()
	if p.Kind != ProgressRebuild || p.DoneBytes != 4<<20 || p.TotalBytes != 9<<20+512 {
		t.Fatalf("rebuild: %+v", p)
	}
	g.setBase(10, 1<<20)
	if p := g.snapshot(); p.DoneBytes != p.TotalBytes {
		t.Fatalf("done beyond total: %+v", p)
	}
	g.catchUp(7, 9, 100) // records streamed beside the base: still a rebuild
	if p := g.snapshot(); p.Kind != ProgressRebuild {
		t.Fatalf("catch-up took over a rebuild: %+v", p)
	}
	g.clear()
	g.catchUp(11, 20, 4096)
	g.catchUp(12, 20, 8192)
	p = g.snapshot()
	if p.Kind != ProgressCatchUp || p.FromLSN != 11 || p.DoneLSN != 12 || p.TargetLSN != 20 || p.DoneBytes != 8192 || p.TotalBytes != 0 {
		t.Fatalf("catch-up: %+v", p)
	}
	g.clear()
	if g.snapshot() != nil {
		t.Fatal("progress after clear")
	}
}

// TestBarrierGauge: one outstanding barrier is timed until an answer
// covers it; a smaller answer does not end it, a reset drops it.
func TestBarrierGauge(t *testing.T) {
	var b barrierGauge
	b.sent(10)
	b.sent(12) // not measured: 10 is outstanding
	b.answered(9)
	if b.snapshot().Count != 0 {
		t.Fatal("an answer below the barrier ended it")
	}
	b.answered(10)
	st := b.snapshot()
	var n uint64
	for _, c := range st.Counts {
		n += c
	}
	if st.Count != 1 || n != 1 || st.SumSec < 0 {
		t.Fatalf("after one answer: %+v", st)
	}
	b.sent(20)
	b.reset()
	b.answered(20)
	if b.snapshot().Count != 1 {
		t.Fatal("a reset barrier was measured")
	}
}
