package blockvol

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/wal"
)

// writeRec is a Write record of n blocks at block b with pattern data.
func writeRec(lsn uint64, b int64, n int, seed uint64) wal.Record {
	return wal.Record{LSN: lsn, Epoch: 1, Type: wal.Write, Offset: b * 4096, Length: uint32(n * 4096), Payload: pattern(seed, n*4096)}
}

// A batch goes in as the same records one at a time would: every write
// reads back, the WAL wraps inside batches (a 64 KiB WAL), a zero record
// and barriers keep their places, and a reopen recovers it all.
func TestApplyRecordsMatchesOneAtATime(t *testing.T) {
	const size = 256 << 10
	v, dir := newVol(t, size, 64<<10)
	want := make([]byte, size)
	r := rand.New(rand.NewPCG(1, 2))
	lsn := uint64(1)
	for round := 0; round < 200; round++ {
		var recs []wal.Record
		for k := 1 + r.IntN(12); k > 0; k-- {
			switch r.IntN(6) {
			case 0:
				b, n := r.Int64N(size/4096-4), 1+r.IntN(4)
				recs = append(recs, wal.Record{LSN: lsn, Epoch: 1, Type: wal.Zero, Offset: b * 4096, Length: uint32(n * 4096)})
				clear(want[b*4096 : (b+int64(n))*4096])
			case 1:
				recs = append(recs, wal.Record{LSN: lsn, Epoch: 1, Type: wal.Barrier})
			default:
				b, n := r.Int64N(size/4096-2), 1+r.IntN(2)
				rec := writeRec(lsn, b, n, lsn)
				recs = append(recs, rec)
				copy(want[b*4096:], rec.Payload)
			}
			lsn++
		}
		n, err := v.ApplyRecords(recs)
		if err != nil || n != len(recs) {
			t.Fatalf("round %d: applied %d of %d: %v", round, n, len(recs), err)
		}
		if v.HeadLSN() != lsn-1 {
			t.Fatalf("round %d: head %d, want %d", round, v.HeadLSN(), lsn-1)
		}
		if round%50 == 0 {
			if got := mustRead(t, v, 0, size); !bytes.Equal(got, want) {
				t.Fatalf("round %d: volume differs from the records applied", round)
			}
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if v.DurableLSN() != lsn-1 {
		t.Fatalf("durable %d after flush, head %d", v.DurableLSN(), lsn-1)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	if v2.HeadLSN() != lsn-1 {
		t.Fatalf("reopened head %d, want %d", v2.HeadLSN(), lsn-1)
	}
	if got := mustRead(t, v2, 0, size); !bytes.Equal(got, want) {
		t.Fatal("reopened volume differs from the records applied")
	}
}

// A bad record inside a batch is refused with the records after it; the
// ones before it are applied. A gap, a duplicate LSN and an invalid extent
// are each refused that way, and the volume stays healthy.
func TestApplyRecordsRefusesFromTheBadRecord(t *testing.T) {
	const size = 1 << 20
	v, _ := newVol(t, size, 1<<20)
	cases := []struct {
		name string
		bad  func(lsn uint64) wal.Record
	}{
		{"gap", func(lsn uint64) wal.Record { return writeRec(lsn+1, 9, 1, 99) }},
		{"duplicate", func(lsn uint64) wal.Record { return writeRec(lsn-1, 9, 1, 99) }},
		{"beyond_end", func(lsn uint64) wal.Record { return writeRec(lsn, size/4096, 1, 99) }},
		{"short_payload", func(lsn uint64) wal.Record {
			r := writeRec(lsn, 9, 1, 99)
			r.Payload = r.Payload[:512]
			return r
		}},
		{"padding", func(lsn uint64) wal.Record { return wal.Record{LSN: lsn, Type: wal.Padding, Length: 4096} }},
	}
	for i, c := range cases {
		head := v.HeadLSN()
		b0 := int64(i * 4)
		recs := []wal.Record{writeRec(head+1, b0, 1, uint64(i)*10+1), writeRec(head+2, b0+1, 1, uint64(i)*10+2)}
		recs = append(recs, c.bad(head+3), writeRec(head+4, b0+2, 1, uint64(i)*10+4))
		n, err := v.ApplyRecords(recs)
		if n != 2 || !errors.Is(err, blockdev.ErrInvalid) {
			t.Fatalf("%s: applied %d, err %v; want 2 and ErrInvalid", c.name, n, err)
		}
		if v.HeadLSN() != head+2 {
			t.Fatalf("%s: head %d, want %d", c.name, v.HeadLSN(), head+2)
		}
		if got := mustRead(t, v, b0*4096, 8192); !bytes.Equal(got, append(recs[0].Payload, recs[1].Payload...)) {
			t.Fatalf("%s: the records before the bad one were not applied", c.name)
		}
		if got := mustRead(t, v, (b0+2)*4096, 4096); !bytes.Equal(got, make([]byte, 4096)) {
			t.Fatalf("%s: the record after the bad one was applied", c.name)
		}
	}
	// Still healthy: the next batch goes in and syncs.
	head := v.HeadLSN()
	if n, err := v.ApplyRecords([]wal.Record{writeRec(head+1, 100, 1, 7)}); n != 1 || err != nil {
		t.Fatalf("after the refusals: %d, %v", n, err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
}

// Snapshot records inside a batch are applied at their place in the LSN
// order: the snapshot keeps the write before it, not the one after it.
func TestApplyRecordsSnapshotInOrder(t *testing.T) {
	v, _ := newVol(t, 1<<20, 1<<20)
	p, err := wal.SnapshotPayload{ID: 3, CreatedNano: 1, Size: 1 << 20, Name: "mid", UUID: newUUID()}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	before, after := writeRec(1, 5, 1, 1), writeRec(3, 5, 1, 2)
	recs := []wal.Record{before, {LSN: 2, Epoch: 1, Type: wal.Snapshot, Length: uint32(len(p)), Payload: p}, after, writeRec(4, 6, 1, 3)}
	if n, err := v.ApplyRecords(recs); n != 4 || err != nil {
		t.Fatalf("applied %d: %v", n, err)
	}
	s := v.Snapshots()
	if len(s) != 1 || s[0].LSN != 2 {
		t.Fatalf("snapshots %+v, want one at LSN 2", s)
	}
	sr, err := v.OpenSnapshot("mid")
	if err != nil {
		t.Fatal(err)
	}
	defer sr.Close()
	got := make([]byte, 4096)
	if err := sr.ReadAt(got, 5*4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, before.Payload) {
		t.Fatal("the snapshot does not hold the write before its record")
	}
	if got := mustRead(t, v, 5*4096, 4096); !bytes.Equal(got, after.Payload) {
		t.Fatal("the live volume does not hold the write after the snapshot record")
	}
}

// A write larger than one batch buffer is applied alone, in its place.
func TestApplyRecordsLargeWrite(t *testing.T) {
	v, _ := newVol(t, 4<<20, 4<<20)
	big := writeRec(2, 16, (pooledMax+8192)/4096, 5)
	recs := []wal.Record{writeRec(1, 0, 1, 1), big, writeRec(3, 1, 1, 3)}
	if n, err := v.ApplyRecords(recs); n != 3 || err != nil {
		t.Fatalf("applied %d: %v", n, err)
	}
	if got := mustRead(t, v, 16*4096, len(big.Payload)); !bytes.Equal(got, big.Payload) {
		t.Fatal("large write reads back wrong")
	}
	if got := mustRead(t, v, 4096, 4096); !bytes.Equal(got, recs[2].Payload) {
		t.Fatal("write after the large one reads back wrong")
	}
}

// A record larger than half this replica's WAL is refused in a batch as
// it is alone (ErrTooLarge), also when the WAL is empty and it would fit
// (a replica's WAL may be smaller than its primary's); the records before
// it are applied.
func TestApplyRecordsTooLargeForThisWAL(t *testing.T) {
	v, _ := newVol(t, 1<<20, 64<<10)
	head := v.HeadLSN()
	big := writeRec(head+1, 0, 12, 5) // 48 KiB of payload
	if _, err := v.ApplyRecords([]wal.Record{big}); !errors.Is(err, blockdev.ErrTooLarge) {
		t.Fatalf("alone in a batch: %v, want ErrTooLarge", err)
	}
	if err := v.ApplyRecord(big); !errors.Is(err, blockdev.ErrTooLarge) {
		t.Fatalf("one at a time: %v, want ErrTooLarge", err)
	}
	recs := []wal.Record{writeRec(head+1, 20, 1, 6), writeRec(head+2, 0, 12, 7)}
	n, err := v.ApplyRecords(recs)
	if n != 1 || !errors.Is(err, blockdev.ErrTooLarge) {
		t.Fatalf("after a small record: applied %d, %v; want 1 and ErrTooLarge", n, err)
	}
}
