package blockvol

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/wal"
)

// ship copies every record the replica lacks from p to r, as replication
// does: ReadRecords on the primary, ValidateRecord then ApplyRecord on the
// replica.
func ship(t testing.TB, p, r *Volume) int {
	t.Helper()
	n := 0
	err := p.ReadRecords(r.HeadLSN()+1, func(rec wal.Record) error {
		rec.Payload = bytes.Clone(rec.Payload)
		if err := r.ValidateRecord(rec); err != nil {
			return err
		}
		n++
		return r.ApplyRecord(rec)
	})
	if err != nil {
		t.Fatalf("ship from LSN %d: %v", r.HeadLSN()+1, err)
	}
	p.HoldRetention("replica", r.HeadLSN()+1)
	return n
}

// sameVolumes compares the snapshot lists (all but HeldBytes) and every
// snapshot's and the live content byte for byte.
func sameVolumes(t testing.TB, p, r *Volume) {
	t.Helper()
	ps, rs := p.Snapshots(), r.Snapshots()
	if len(ps) != len(rs) {
		t.Fatalf("primary has %d snapshots, replica %d", len(ps), len(rs))
	}
	for i := range ps {
		a, b := ps[i], rs[i]
		a.HeldBytes, b.HeldBytes = 0, 0
		if a != b {
			t.Fatalf("snapshot %d: primary %+v, replica %+v", i, a, b)
		}
		if !bytes.Equal(readSnapshot(t, p, a.Name), readSnapshot(t, r, a.Name)) {
			t.Fatalf("snapshot %q differs between primary and replica", a.Name)
		}
	}
	if !bytes.Equal(mustRead(t, p, 0, int(p.Size())), mustRead(t, r, 0, int(r.Size()))) {
		t.Fatal("live content differs between primary and replica")
	}
}

// Snapshots created, deleted and restored on a primary appear identical
// on a replica that applies the primary's records, including after the
// replica reopens.
func TestSnapshotReplicaFollows(t *testing.T) {
	const size = 1 << 20
	// The test ships between steps, not during them: the primary's WAL
	// holds everything a restore writes while the replica's hold stays.
	p, _ := newVol(t, size, 8<<20)
	r, rdir := newVol(t, size, 256<<10)
	p.HoldRetention("replica", 1)
	m := newSnapModel(size)
	rng := rand.New(rand.NewPCG(5, 6))
	next, deletes, restores, shipped := 0, 0, 0, 0
	for step := 0; step < 300; step++ {
		switch k := rng.IntN(40); {
		case k < 28:
			off := int64(rng.IntN(size/4096-4)) * 4096
			if rng.IntN(5) == 0 {
				m.trim(t, p, off, int64(1+rng.IntN(4))*4096)
			} else {
				m.write(t, p, pattern(uint64(step), (1+rng.IntN(4))*4096), off)
			}
		case k < 32:
			m.create(t, p, fmt.Sprintf("s%d", next))
			next++
		case k < 35:
			if name := anySnap(m, rng); name != "" {
				if err := p.DeleteSnapshot(name); err != nil {
					t.Fatal(err)
				}
				delete(m.snaps, name)
				deletes++
			}
		case k < 37:
			if name := anySnap(m, rng); name != "" {
				if err := p.RestoreSnapshot(name); err != nil {
					t.Fatal(err)
				}
				copy(m.live, m.snaps[name])
				restores++
			}
		case k < 39:
			shipped += ship(t, p, r)
		default:
			flushAll(t, p)
		}
	}
	shipped += ship(t, p, r)
	t.Logf("%d creates, %d deletes, %d restores, %d records shipped", next, deletes, restores, shipped)
	m.check(t, p)
	m.check(t, r)
	sameVolumes(t, p, r)
	if len(m.snaps) == 0 {
		t.Fatal("the run left no snapshot to compare")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r2, err := Open(rdir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	sameVolumes(t, p, r2)
	// The replica keeps following after its reopen.
	m.create(t, p, "after")
	m.write(t, p, pattern(77, 4096), 0)
	ship(t, p, r2)
	sameVolumes(t, p, r2)
}

func anySnap(m *snapModel, rng *rand.Rand) string {
	if len(m.snaps) == 0 {
		return ""
	}
	names := make([]string, 0, len(m.snaps))
	for n := range m.snaps {
		names = append(names, n)
	}
	// Map order is random; sort for a reproducible pick.
	for i := 1; i < len(names); i++ {
		for j := i; j > 0 && names[j] < names[j-1]; j-- {
			names[j], names[j-1] = names[j-1], names[j]
		}
	}
	return names[rng.IntN(len(names))]
}

// Malformed snapshot records are refused by ValidateRecord and
// ApplyRecord before anything is stored.
func TestSnapshotRecordValidation(t *testing.T) {
	v, _ := newVol(t, 1<<20, 256<<10)
	good := wal.SnapshotPayload{ID: 7, CreatedNano: 1, Size: 1 << 20, Name: "s", UUID: newUUID()}
	enc := func(p wal.SnapshotPayload) []byte {
		b, err := p.Encode()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	mod := func(f func(*wal.SnapshotPayload)) []byte { p := good; f(&p); return enc(p) }
	bad := map[string]wal.Record{
		"empty":        {Type: wal.Snapshot},
		"short":        {Type: wal.Snapshot, Payload: enc(good)[:20]},
		"trailing":     {Type: wal.Snapshot, Payload: append(enc(good), 0)},
		"bad_name":     {Type: wal.Snapshot, Payload: mod(func(p *wal.SnapshotPayload) { p.Name = "a@b" })},
		"empty_name":   {Type: wal.Snapshot, Payload: mod(func(p *wal.SnapshotPayload) { p.Name = "" })},
		"bad_uuid":     {Type: wal.SnapshotDelete, Payload: mod(func(p *wal.SnapshotPayload) { p.UUID = "x" })},
		"id_zero":      {Type: wal.Snapshot, Payload: mod(func(p *wal.SnapshotPayload) { p.ID = 0 })},
		"size_zero":    {Type: wal.Snapshot, Payload: mod(func(p *wal.SnapshotPayload) { p.Size = 0 })},
		"size_odd":     {Type: wal.Snapshot, Payload: mod(func(p *wal.SnapshotPayload) { p.Size = 4097 })},
		"with_offset":  {Type: wal.Snapshot, Offset: 4096, Payload: enc(good)},
		"version":      {Type: wal.Snapshot, Payload: func() []byte { b := enc(good); b[0] = 9; return b }()},
		"length_lies":  {Type: wal.Snapshot, Length: 3, Payload: enc(good)},
		"unknown_type": {Type: wal.RecordType(9), Payload: enc(good)},
	}
	for name, rec := range bad {
		rec.LSN = 1
		if rec.Length == 0 {
			rec.Length = uint32(len(rec.Payload))
		}
		if err := v.ValidateRecord(rec); !errors.Is(err, blockdev.ErrInvalid) {
			t.Errorf("%s: ValidateRecord: %v", name, err)
		}
		if err := v.ApplyRecord(rec); !errors.Is(err, blockdev.ErrInvalid) {
			t.Errorf("%s: ApplyRecord: %v", name, err)
		}
	}
	if v.HeadLSN() != 0 || len(v.Snapshots()) != 0 {
		t.Fatalf("a refused record changed the volume: head %d, %d snapshots", v.HeadLSN(), len(v.Snapshots()))
	}
	p := enc(good)
	rec := wal.Record{LSN: 1, Type: wal.Snapshot, Length: uint32(len(p)), Payload: p}
	if err := v.ApplyRecord(rec); err != nil {
		t.Fatalf("good snapshot record: %v", err)
	}
	rec.LSN = 2
	if err := v.ApplyRecord(rec); !errors.Is(err, blockdev.ErrInvalid) {
		t.Fatalf("duplicate snapshot record: %v", err)
	}
	if s := v.Snapshots(); len(s) != 1 || s[0].ID != 7 || s[0].LSN != 1 || s[0].UUID != good.UUID {
		t.Fatalf("snapshots %+v", s)
	}
	// The volume's own next ID continues after the replicated one.
	in, err := v.CreateSnapshot("own", SnapshotOptions{})
	if err != nil || in.ID != 8 {
		t.Fatalf("create after a replicated snapshot: %+v %v", in, err)
	}
}

// A replica rebuilt from a base copy (ReplResetHead, ReplWriteBase) has
// no WAL history; InstallSnapshot, newest first, with the primary's
// ChangedRanges, gives it the same snapshots, byte for byte, and it then
// follows the primary's snapshot records as usual.
func TestSnapshotInstallOnRebuiltReplica(t *testing.T) {
	const size = 1 << 20
	p, _ := newVol(t, size, 8<<20)
	r, _ := newVol(t, size, 256<<10)
	m := newSnapModel(size)
	rng := rand.New(rand.NewPCG(8, 8))
	for k := 0; k < 5; k++ {
		for i := 0; i < 30; i++ {
			off := int64(rng.IntN(size/4096-2)) * 4096
			if i%7 == 0 {
				m.trim(t, p, off, 8192)
			} else {
				m.write(t, p, pattern(uint64(k*100+i), 8192), off)
			}
		}
		if k%2 == 0 {
			flushAll(t, p)
		}
		m.create(t, p, fmt.Sprintf("s%d", k))
	}
	m.write(t, p, pattern(999, 64<<10), 128<<10) // unflushed on the primary
	if err := p.DeleteSnapshot("s2"); err != nil {
		t.Fatal(err)
	}
	delete(m.snaps, "s2")
	p.HoldRetention("replica", p.HeadLSN()+1)
	// The rebuild: reset the head, copy the live data.
	if err := r.ReplResetHead(p.HeadLSN()); err != nil {
		t.Fatal(err)
	}
	if err := r.ReplWriteBase(0, mustRead(t, p, 0, size)); err != nil {
		t.Fatal(err)
	}
	if err := r.ReplSyncBase(); err != nil {
		t.Fatal(err)
	}
	snaps := p.Snapshots()
	for i := len(snaps) - 1; i >= 0; i-- {
		in := snaps[i]
		var ranges []Range
		if i < len(snaps)-1 {
			var err error
			if ranges, err = p.ChangedRanges(in.Name, snaps[i+1].Name); err != nil {
				t.Fatal(err)
			}
		}
		src, err := p.OpenSnapshot(in.Name)
		if err != nil {
			t.Fatal(err)
		}
		err = r.InstallSnapshot(in, ranges, src.ReadAt)
		src.Close()
		if err != nil {
			t.Fatalf("install %q: %v", in.Name, err)
		}
	}
	sameVolumes(t, p, r)
	m.check(t, r)
	// Wrong order and duplicates are refused.
	if err := r.InstallSnapshot(snaps[len(snaps)-1], nil, nil); !errors.Is(err, ErrSnapshotExists) {
		t.Fatalf("duplicate install: %v", err)
	}
	late := snaps[0]
	late.ID, late.Name, late.LSN = 99, "late", snaps[len(snaps)-1].LSN+1
	if err := r.InstallSnapshot(late, nil, nil); !errors.Is(err, blockdev.ErrInvalid) {
		t.Fatalf("install out of order: %v", err)
	}
	// Life goes on: records flow, snapshots keep matching.
	m.write(t, p, pattern(1000, 16384), 0)
	m.create(t, p, "after")
	m.write(t, p, pattern(1001, 16384), 4096)
	if err := p.DeleteSnapshot("s0"); err != nil {
		t.Fatal(err)
	}
	delete(m.snaps, "s0")
	if err := p.RestoreSnapshot("s3"); err != nil {
		t.Fatal(err)
	}
	copy(m.live, m.snaps["s3"])
	ship(t, p, r)
	flushAll(t, r)
	sameVolumes(t, p, r)
	m.check(t, r)
}

// A replica that does not hold a snapshot (rebuilt without it) accepts
// the primary's delete record for the LSN sequence, and its flusher
// checkpoints past it (it once stayed behind a checkpoint ceiling).
func TestSnapshotDeleteRecordForAbsentSnapshot(t *testing.T) {
	v, _ := newVol(t, 1<<20, 256<<10)
	p, err := wal.SnapshotPayload{ID: 4, CreatedNano: 1, Size: 1 << 20, Name: "gone", UUID: newUUID()}.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if err := v.ApplyRecord(wal.Record{LSN: 1, Type: wal.SnapshotDelete, Length: uint32(len(p)), Payload: p}); err != nil {
		t.Fatal(err)
	}
	if err := v.ApplyRecord(wal.Record{LSN: 2, Type: wal.Write, Length: 4096, Payload: pattern(1, 4096)}); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	if v.CheckpointLSN() != 2 {
		t.Fatalf("checkpoint at %d after a delete record for an absent snapshot, head %d", v.CheckpointLSN(), v.HeadLSN())
	}
}
