package blockvol

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

// TestPowerCutApplyRecords cuts the power of a replica volume in the
// middle of batched applies (ApplyRecords, with a Flush now and then as a
// barrier does) and checks what a reboot finds: the records up to some
// LSN h, each whole, and nothing else — the image equals the one the
// records up to h produce (no partial record, no hole, nothing of a
// record after h) — and h is at least every DurableLSN a Flush reported
// before the cut (what the replica answers a barrier with was on disk).
// The WAL is 64 KiB, so batches wrap around the ring and the flusher
// checkpoints while they are applied; cuts drop, keep or tear the
// unsynced writes (a torn batch write keeps a prefix of its sectors).
func TestPowerCutApplyRecords(t *testing.T) {
	cycles := max(cyclesWanted()/4, 20)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("BLOCKVOL_CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (BLOCKVOL_CRASH_SEED), %d cycles", seed, cycles)
	r := rand.New(rand.NewPCG(seed, 43))
	const nblocks = 64
	const size = nblocks * 4096
	fs := vfs.NewCrashFS()
	opts := Options{Size: size, WALSize: 64 << 10, FS: fs, Logger: testLogger(t), WALFullTimeout: 200 * time.Millisecond}
	v, err := Create("/vol", opts)
	if err != nil {
		t.Fatal(err)
	}
	base := make([]byte, size) // the image at LSN baseLSN
	var baseLSN uint64
	var recs []wal.Record // applied since baseLSN
	image := func(upTo uint64) []byte {
		img := bytes.Clone(base)
		for _, rec := range recs[:upTo-baseLSN] {
			switch rec.Type {
			case wal.Write:
				copy(img[rec.Offset:], rec.Payload)
			case wal.Zero:
				clear(img[rec.Offset : rec.Offset+int64(rec.Length)])
			}
		}
		return img
	}
	torn, batches, flushes := 0, 0, 0
	for c := 0; c < cycles; c++ {
		fs.CutAfter(int64(r.IntN(400)))
		var durable uint64
		for k := 0; k < 40; k++ {
			lsn := baseLSN + uint64(len(recs)) + 1
			batch := make([]wal.Record, 1+r.IntN(24))
			for i := range batch {
				switch x := r.IntN(10); {
				case x == 0:
					batch[i] = wal.Record{LSN: lsn, Epoch: 1, Type: wal.Barrier}
				case x == 1:
					b, n := r.Int64N(nblocks-3), 1+r.IntN(3)
					batch[i] = wal.Record{LSN: lsn, Epoch: 1, Type: wal.Zero, Offset: b * 4096, Length: uint32(n * 4096)}
				default:
					b, n := r.Int64N(nblocks-1), 1+r.IntN(2)
					batch[i] = writeRec(lsn, b, n, r.Uint64())
				}
				lsn++
			}
			n, err := v.ApplyRecords(batch)
			recs = append(recs, batch[:n]...)
			batches++
			if err != nil {
				break // the power is gone
			}
			if r.IntN(3) == 0 {
				flushes++
				if err := v.Flush(); err != nil {
					break
				}
				durable = v.DurableLSN()
				if durable != baseLSN+uint64(len(recs)) {
					t.Fatalf("cycle %d: DurableLSN %d after a flush of head %d", c, durable, baseLSN+uint64(len(recs)))
				}
			}
		}
		cut := vfs.CutOptions{Rand: rand.New(rand.NewPCG(r.Uint64(), 9))}
		switch r.IntN(4) {
		case 1:
			cut.KeepProb, cut.Tear = 1, true
		case 2:
			cut.KeepProb, cut.Tear = 0.5, true
		case 3:
			cut.KeepProb = 0.9
		}
		if cut.Tear {
			torn++
		}
		nfs := fs.PowerCut(cut)
		v.fail(errors.New("test: power cut"))
		v.Close()
		fs = nfs
		opts.FS = fs
		if v, err = Open("/vol", opts); err != nil {
			t.Fatalf("cycle %d: recovery (cut %+v): %v", c, cut, err)
		}
		h := v.HeadLSN()
		last := baseLSN + uint64(len(recs))
		if h < durable || h > last || h < baseLSN {
			t.Fatalf("cycle %d: recovered head %d; reported durable %d, last applied %d, base %d", c, h, durable, last, baseLSN)
		}
		got := make([]byte, size)
		if err := v.ReadAt(got, 0); err != nil {
			t.Fatalf("cycle %d: read: %v", c, err)
		}
		if want := image(h); !bytes.Equal(got, want) {
			for b := 0; b < nblocks; b++ {
				g := got[b*4096 : (b+1)*4096]
				if bytes.Equal(g, want[b*4096:(b+1)*4096]) {
					continue
				}
				// The flusher punches every pending zero range, also one
				// whose record a crash then loses (the engine's per-block
				// contract allows the trimmed version): a block may read
				// as zeroes when a zero record after h covers it. The
				// primary's catch-up from h+1 replays that record and
				// every later one in order.
				if bytes.Equal(g, make([]byte, 4096)) && zeroedAfter(recs[h-baseLSN:], int64(b)*4096) {
					copy(want[b*4096:], g)
					continue
				}
				t.Fatalf("cycle %d (cut %+v): block %d differs from the image of records 1..%d (durable %d, last %d); zero %v, zeroed after: %v",
					c, cut, b, h, durable, last, bytes.Equal(g, make([]byte, 4096)), zeroedAfter(recs[h-baseLSN:], int64(b)*4096))
			}
		}
		base, baseLSN, recs = got, h, nil
	}
	v.Close()
	t.Logf("%d cycles (%d with torn writes), %d batches, %d flushes", cycles, torn, batches, flushes)
}

// zeroedAfter reports whether a zero record of recs covers offset off.
func zeroedAfter(recs []wal.Record, off int64) bool {
	for _, r := range recs {
		if r.Type == wal.Zero && off >= r.Offset && off < r.Offset+int64(r.Length) {
			return true
		}
	}
	return false
}
