package blockvol

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/blockd/blockd/wal"
)

func fillPattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7+i/4096)
	}
	return b
}

// A large aligned write goes around the WAL: one small record, the data
// once in a data file; reads, a reopen, a small write and a trim into
// its chunk, block status and the checkpoint all see the same bytes, and
// the old slot's space is given back.
func TestRedirectBasics(t *testing.T) {
	v, dir := newVol(t, 8<<20, 4<<20)
	big := fillPattern(1<<20, 1)
	if err := v.WriteAt(big, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	st := v.Stats()
	if st.RedirectWrites != 1 || st.RedirectBytes != 1<<20 {
		t.Fatalf("stats after one 1 MiB write: %+v", st)
	}
	// The WAL holds a record of tens of bytes, not a MiB.
	if used := st.WALUsedBytes; used > 4096 {
		t.Fatalf("WAL holds %d bytes after a redirected write", used)
	}
	got := make([]byte, 1<<20)
	if err := v.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, big))
	}
	// A small write into the redirected chunk settles the redirect first.
	small := fillPattern(4096, 9)
	if err := v.WriteAt(small, 1<<20+8192, false); err != nil {
		t.Fatal(err)
	}
	if v.Stats().RedirectSettles != 1 {
		t.Fatalf("settles: %d, want 1", v.Stats().RedirectSettles)
	}
	copy(big[8192:], small)
	if err := v.Trim(1<<20+512<<10, 64<<10); err != nil {
		t.Fatal(err)
	}
	clear(big[512<<10 : 576<<10])
	check := func(what string) {
		t.Helper()
		if err := v.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, big) {
			t.Fatalf("%s: %v, equal %v", what, err, bytes.Equal(got, big))
		}
		ext, err := v.BlockStatus(1<<20, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		var holes int64
		for _, e := range ext {
			if e.Hole {
				holes += e.Length
			}
		}
		if holes != 64<<10 {
			t.Fatalf("%s: block status %v: %d bytes of holes, want 64 KiB", what, ext, holes)
		}
	}
	check("before the checkpoint")
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	check("after the checkpoint")
	if v.slots.npending.Load() != 0 {
		t.Fatalf("%d redirects pending after a checkpoint", v.slots.npending.Load())
	}
	// One copy of the data on disk: the slot not in use was punched.
	ext, _ := v.extF.Allocated(0, 8<<20)
	sh, _ := v.shF.Allocated(0, 8<<20)
	var total int64
	for _, r := range append(ext, sh...) {
		total += r.Len
	}
	if total > 1<<20 {
		t.Fatalf("%d bytes allocated in extent+shadow for 1 MiB written (extent %v shadow %v)", total, ext, sh)
	}
	v.Close()
	v, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	check("after reopen")
	// Unaligned or small large writes take the WAL.
	if err := v.WriteAt(fillPattern(1<<20, 3), 1<<20+4096, false); err != nil {
		t.Fatal(err)
	}
	if n := v.Stats().RedirectWrites; n != 0 {
		t.Fatalf("an unaligned write was redirected (%d)", n)
	}
}

// Replication reads a redirected write back as the Write it stands for;
// once a later write overwrote its data in place, reading it says so
// (ErrNotRetained), so the replica gets a full transfer instead of wrong
// bytes.
func TestRedirectReadRecords(t *testing.T) {
	v, _ := newVol(t, 8<<20, 4<<20)
	v.pauseFlusher.Store(true) // the records stay in the log, unsynced
	first := fillPattern(256<<10, 5)
	if err := v.WriteAt(first, 0, false); err != nil {
		t.Fatal(err)
	}
	lsn := v.HeadLSN()
	var got []wal.Record
	if err := v.ReadRecords(lsn, func(r wal.Record) error {
		r.Payload = append([]byte(nil), r.Payload...)
		got = append(got, r)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Type != wal.Write || got[0].Offset != 0 || !bytes.Equal(got[0].Payload, first) {
		t.Fatalf("read back %d records (first type %v)", len(got), got[0].Type)
	}
	// Not durable yet: the next write of the same chunks goes in place.
	if err := v.WriteAt(fillPattern(256<<10, 6), 0, false); err != nil {
		t.Fatal(err)
	}
	err := v.ReadRecords(lsn, func(wal.Record) error { return nil })
	if !errors.Is(err, ErrNotRetained) || !strings.Contains(err.Error(), "overwritten since") {
		t.Fatalf("reading an overwritten redirect: %v, want ErrNotRetained", err)
	}
	t.Logf("refusal: %v", err)
	// A replica never takes a Redirect record itself.
	rec := wal.Record{LSN: v.HeadLSN() + 1, Type: wal.Redirect, Offset: 0, Length: 32, Payload: make([]byte, 32)}
	if err := v.ValidateRecord(rec); err == nil {
		t.Fatal("a replica accepted a redirect record")
	}
}
