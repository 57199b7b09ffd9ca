package blockvol

import (
	"errors"
	"math"
	"testing"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/wal"
)

// A record from a primary that fails validation is refused before it
// reaches the WAL and leaves the volume healthy: the next good record
// applies, the flusher checkpoints it and a reopen recovers it. The
// first case is issue 18's frame (offset 2^63-4096, length 8192), whose
// end wraps below zero in a naive off+len > size check.
func TestApplyRecordRefusesBadExtents(t *testing.T) {
	const size = 1 << 20
	v, dir := newVol(t, size, 4<<20)
	data := func(n int) []byte { return make([]byte, n) }
	bad := []struct {
		name string
		rec  wal.Record
	}{
		{"overflow_issue18", wal.Record{Type: wal.Write, Offset: math.MaxInt64 - 4095, Length: 8192, Payload: data(8192)}},
		{"overflow_zero", wal.Record{Type: wal.Zero, Offset: math.MaxInt64 - 4095, Length: 8192}},
		{"max_offset", wal.Record{Type: wal.Write, Offset: math.MaxInt64 &^ 4095, Length: 4096, Payload: data(4096)}},
		{"max_length", wal.Record{Type: wal.Zero, Offset: 4096, Length: math.MaxUint32 &^ 4095}},
		{"negative_offset", wal.Record{Type: wal.Write, Offset: -4096, Length: 4096, Payload: data(4096)}},
		{"min_offset", wal.Record{Type: wal.Zero, Offset: math.MinInt64, Length: 4096}},
		{"unaligned_offset", wal.Record{Type: wal.Write, Offset: 512, Length: 4096, Payload: data(4096)}},
		{"unaligned_length", wal.Record{Type: wal.Write, Offset: 0, Length: 4096 + 512, Payload: data(4096 + 512)}},
		{"zero_length", wal.Record{Type: wal.Zero, Offset: 0, Length: 0}},
		{"beyond_end", wal.Record{Type: wal.Write, Offset: size, Length: 4096, Payload: data(4096)}},
		{"straddles_end", wal.Record{Type: wal.Zero, Offset: size - 4096, Length: 8192}},
		{"oversized_write", wal.Record{Type: wal.Write, Offset: 0, Length: blockdev.MaxIOSize + 8192, Payload: data(blockdev.MaxIOSize + 8192)}},
		{"short_payload", wal.Record{Type: wal.Write, Offset: 0, Length: 8192, Payload: data(4096)}},
		{"zero_with_data", wal.Record{Type: wal.Zero, Offset: 0, Length: 4096, Payload: data(4096)}},
		{"barrier_with_extent", wal.Record{Type: wal.Barrier, Offset: 4096, Length: 4096}},
		{"padding", wal.Record{Type: wal.Padding, Length: 4096}},
	}
	for _, c := range bad {
		c.rec.LSN = v.HeadLSN() + 1
		if err := v.ValidateRecord(c.rec); !errors.Is(err, blockdev.ErrInvalid) {
			t.Errorf("%s: ValidateRecord: %v, want ErrInvalid", c.name, err)
		}
		if err := v.ApplyRecord(c.rec); !errors.Is(err, blockdev.ErrInvalid) {
			t.Errorf("%s: ApplyRecord: %v, want ErrInvalid", c.name, err)
		}
		if v.HeadLSN() != 0 {
			t.Fatalf("%s: head moved to %d: the record reached the WAL", c.name, v.HeadLSN())
		}
	}
	good := wal.Record{LSN: 1, Epoch: 1, Type: wal.Write, Offset: size - 4096, Length: 4096, Payload: pattern(1, 4096)}
	if err := v.ApplyRecord(good); err != nil {
		t.Fatalf("good record after the bad ones: %v", err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatalf("checkpoint after the bad records: %v", err)
	}
	if v.CheckpointLSN() != 1 {
		t.Fatalf("checkpoint LSN %d, want 1", v.CheckpointLSN())
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer v2.Close()
	if got := mustRead(t, v2, size-4096, 4096); string(got) != string(good.Payload) {
		t.Fatal("good record lost across reopen")
	}
}

// checkExtent never overflows: every combination of edge values agrees
// with the same rule computed in uint64 where it cannot wrap.
func TestCheckExtentEdges(t *testing.T) {
	const size, bs = 1 << 30, 4096
	vals := []int64{math.MinInt64, math.MinInt64 + 4096, -4096, -1, 0, 1, 512, 4096, size - 4096, size, size + 4096,
		math.MaxInt64 - 8191, math.MaxInt64 - 4095, math.MaxInt64 &^ 4095, math.MaxInt64, math.MaxUint32 &^ 4095}
	for _, off := range vals {
		for _, n := range vals {
			got := checkExtent(size, bs, off, n) == nil
			want := off >= 0 && n > 0 && off%bs == 0 && n%bs == 0 && uint64(off)+uint64(n) <= size
			if got != want {
				t.Errorf("checkExtent(off=%d, len=%d) ok=%v, want %v", off, n, got, want)
			}
		}
	}
}
