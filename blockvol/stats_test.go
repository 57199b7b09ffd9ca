package blockvol

import (
	"path/filepath"
	"testing"
)

// TestStats: flushes count as group commits with their batch sizes, the
// WAL shows what it holds, the flusher lag what is not checkpointed.
func TestStats(t *testing.T) {
	v, err := Create(filepath.Join(t.TempDir(), "v"), Options{Size: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	p := make([]byte, 4096)
	for i := 0; i < 5; i++ {
		if err := v.WriteAt(p, int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	st := v.Stats()
	if st.HeadLSN != 5 || st.DurableLSN != 5 || st.WALSizeBytes != v.WALSize() || st.WALUsedBytes <= 0 {
		t.Fatalf("stats %+v", st)
	}
	if st.GroupCommits != 1 || st.GroupCommitRecords != 5 || st.BatchCounts[3] != 1 { // 5 records: bucket <= 8
		t.Fatalf("group commit: %+v", st)
	}
	var n uint64
	for _, c := range st.BatchCounts {
		n += c
	}
	if n != st.GroupCommits {
		t.Fatalf("histogram counts %d, commits %d", n, st.GroupCommits)
	}
	if st.FlusherLag() != st.HeadLSN-st.CheckpointLSN {
		t.Fatalf("lag %d", st.FlusherLag())
	}
}
