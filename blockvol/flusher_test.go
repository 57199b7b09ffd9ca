package blockvol

import (
	"encoding/binary"
	"math/rand/v2"
	"path/filepath"
	"testing"
)

// More dirty blocks than one staging pass holds (flushStageMax), in random
// order with runs of neighbours, some rewritten: after the flusher has
// checkpointed everything and the volume is reopened (the WAL then holds
// nothing to replay), every block reads back as its last write from the
// extent.
func TestFlusherManyPasses(t *testing.T) {
	const bs = 4096
	nblocks := 3 * int(flushStageMax/bs)
	dir := filepath.Join(t.TempDir(), "v")
	opts := Options{Size: int64(nblocks) * bs, WALSize: 256 << 20}
	v, err := Create(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	last := make([]uint32, nblocks)
	buf := make([]byte, 3*bs)
	tag := uint32(0)
	for i := 0; i < 2*nblocks; i++ {
		b := r.IntN(nblocks - 2)
		n := 1 + r.IntN(3)
		tag++
		for k := 0; k < n; k++ {
			binary.LittleEndian.PutUint32(buf[k*bs:], tag)
			binary.LittleEndian.PutUint32(buf[k*bs+4:], uint32(b+k))
			last[b+k] = tag
		}
		if err := v.WriteAt(buf[:n*bs], int64(b)*bs, false); err != nil {
			t.Fatal(err)
		}
	}
	fw0 := v.flushWrites.Load()
	waitCheckpoint(t, v)
	t.Logf("%d blocks, %d writes, %d extent pwrites", nblocks, tag, v.flushWrites.Load()-fw0)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	if v, err = Open(dir, opts); err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if v.dirty.len() != 0 {
		t.Fatalf("%d dirty blocks after a clean reopen", v.dirty.len())
	}
	all := make([]byte, nblocks*bs)
	if err := v.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	for b := 0; b < nblocks; b++ {
		got := binary.LittleEndian.Uint32(all[b*bs:])
		gotB := binary.LittleEndian.Uint32(all[b*bs+4:])
		if got != last[b] || (got != 0 && gotB != uint32(b)) {
			t.Fatalf("block %d: tag %d block %d, want tag %d", b, got, gotB, last[b])
		}
	}
}
