package blockvol

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"
)

// blockWrite is one write of a whole block, its content derived from seq.
type blockWrite struct {
	seq   int
	block int
}

func blockContent(seq, block int) []byte {
	return pattern(uint64(seq)<<20|uint64(block), 4096)
}

// A volume holds 1,000 snapshots, each taken after some writes, and every
// one of them reads as it was taken: while they exist, after half of them
// are deleted, and after a reopen.
func TestThousandSnapshots(t *testing.T) {
	const nblocks, nsnaps = 64, 1000
	v, dir := newVol(t, nblocks*4096, 1<<20)
	rng := rand.New(rand.NewPCG(1, 1000))
	// history[b]: the writes of block b in order; snapAt[k]: the number
	// of writes issued before snapshot k.
	history := make([][]blockWrite, nblocks)
	snapAt := make([]int, nsnaps)
	seq := 0
	t0 := time.Now()
	for k := 0; k < nsnaps; k++ {
		for i := 0; i < 1+rng.IntN(3); i++ {
			b := rng.IntN(nblocks)
			seq++
			if err := v.WriteAt(blockContent(seq, b), int64(b)*4096, false); err != nil {
				t.Fatal(err)
			}
			history[b] = append(history[b], blockWrite{seq, b})
		}
		snapAt[k] = seq
		if _, err := v.CreateSnapshot(fmt.Sprintf("snap-%04d", k), SnapshotOptions{}); err != nil {
			t.Fatalf("snapshot %d: %v", k, err)
		}
	}
	created := time.Since(t0)
	alive := make([]bool, nsnaps)
	for k := range alive {
		alive[k] = true
	}
	// writes in issue order, to build each snapshot's expected image from
	// the previous one.
	var writes []blockWrite
	for b := range history {
		writes = append(writes, history[b]...)
	}
	slices.SortFunc(writes, func(a, b blockWrite) int { return a.seq - b.seq })
	check := func(v *Volume, what string) {
		t.Helper()
		n := 0
		want := make([]byte, nblocks*4096)
		wi := 0
		for k := 0; k < nsnaps; k++ {
			for ; wi < len(writes) && writes[wi].seq <= snapAt[k]; wi++ {
				copy(want[writes[wi].block*4096:], blockContent(writes[wi].seq, writes[wi].block))
			}
			if !alive[k] {
				continue
			}
			n++
			got := readSnapshot(t, v, fmt.Sprintf("snap-%04d", k))
			if !bytes.Equal(got, want) {
				t.Fatalf("%s: snapshot %d differs at byte %d", what, k, firstDiff(got, want))
			}
		}
		if got := len(v.Snapshots()); got != n {
			t.Fatalf("%s: %d snapshots listed, want %d", what, got, n)
		}
	}
	check(v, "all")
	t1 := time.Now()
	for k := 1; k < nsnaps; k += 2 {
		if err := v.DeleteSnapshot(fmt.Sprintf("snap-%04d", k)); err != nil {
			t.Fatal(err)
		}
		alive[k] = false
	}
	deleted := time.Since(t1)
	check(v, "after deleting half")
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	t2 := time.Now()
	v2, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	reopened := time.Since(t2)
	check(v2, "after reopen")
	t.Logf("%d snapshots created in %v, %d deleted in %v, reopened with %d in %v",
		nsnaps, created, nsnaps/2, deleted, len(v2.Snapshots()), reopened)
}

// allocatedBytes sums the allocated size (stat blocks) of the files in dir.
func allocatedBytes(t testing.TB, dir string) int64 {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range ents {
		st, err := os.Stat(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		n += st.Sys().(*syscall.Stat_t).Blocks * 512
	}
	return n
}

// DeleteSnapshot gives the space back: the volume directory's allocated
// bytes (stat blocks) shrink by about what the snapshot held.
func TestSnapshotDeleteFreesSpace(t *testing.T) {
	v, dir := newVol(t, 16<<20, 4<<20)
	if err := v.WriteAt(pattern(1, 8<<20), 0, false); err != nil {
		t.Fatal(err)
	}
	if _, err := v.CreateSnapshot("old", SnapshotOptions{}); err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < 8<<20; off += 1 << 20 {
		if err := v.WriteAt(pattern(uint64(off)+2, 1<<20), off, false); err != nil {
			t.Fatal(err)
		}
	}
	flushAll(t, v)
	in, err := v.SnapshotInfo("old")
	if err != nil {
		t.Fatal(err)
	}
	if in.HeldBytes < 8<<20 {
		t.Fatalf("snapshot holds %d bytes after 8 MiB were overwritten", in.HeldBytes)
	}
	before := allocatedBytes(t, dir)
	if err := v.DeleteSnapshot("old"); err != nil {
		t.Fatal(err)
	}
	after := allocatedBytes(t, dir)
	t.Logf("allocated bytes: %d before the delete, %d after (snapshot held %d)", before, after, in.HeldBytes)
	if before-after < in.HeldBytes*9/10 {
		t.Fatalf("delete gave back %d bytes, the snapshot held %d", before-after, in.HeldBytes)
	}
}
