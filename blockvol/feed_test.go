package blockvol

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/blockd/blockd/wal"
)

// The feed gives every record in LSN order with its own copy of the
// payload; past its bound it drops records and reports the lost range
// once, and what Take returns is always contiguous.
func TestRecordFeedOrderAndLoss(t *testing.T) {
	v, _ := newVol(t, 2<<20, 1<<20)
	f, err := v.SubscribeRecords()
	if err != nil {
		t.Fatal(err)
	}
	write := func(i int) {
		t.Helper()
		if err := v.WriteAt(pattern(uint64(i), 4096), int64(i%64)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 5; i++ {
		write(i)
	}
	if err := v.Trim(0, 4096); err != nil {
		t.Fatal(err)
	}
	select {
	case <-f.Ready():
	default:
		t.Fatal("feed not ready after appends")
	}
	recs, lost := f.Take(nil)
	if lost.From != 0 || len(recs) != 6 {
		t.Fatalf("took %d records, lost %+v", len(recs), lost)
	}
	for i, r := range recs {
		if r.LSN != uint64(i+1) {
			t.Fatalf("record %d has LSN %d", i, r.LSN)
		}
		if i < 5 && (r.Type != wal.Write || !bytes.Equal(r.Payload, pattern(uint64(i), 4096))) {
			t.Fatalf("record %d: type %v, payload differs", i, r.Type)
		}
	}
	if recs[5].Type != wal.Zero || recs[5].Payload != nil {
		t.Fatalf("trim record %+v", recs[5])
	}
	f.Recycle(recs)

	// Bound of two 4 KiB payloads: the third and later ones are lost, even
	// a zero record that would fit, until the next Take.
	f.mu.Lock()
	f.max = 8192
	f.mu.Unlock()
	for i := 0; i < 4; i++ {
		write(i)
	}
	if err := v.Trim(4096, 4096); err != nil {
		t.Fatal(err)
	}
	recs, lost = f.Take(recs[:0])
	if len(recs) != 2 || recs[0].LSN != 7 || recs[1].LSN != 8 || lost != (Lost{From: 9, To: 11}) {
		t.Fatalf("took %d records from %d, lost %+v; want 7..8 and lost 9..11", len(recs), recs[0].LSN, lost)
	}
	f.Recycle(recs)
	write(9)
	recs, lost = f.Take(recs[:0])
	if len(recs) != 1 || recs[0].LSN != 12 || lost.From != 0 {
		t.Fatalf("after the loss: %d records, lost %+v", len(recs), lost)
	}
	f.Recycle(recs)

	// One subscriber at a time; after Close the volume takes a new one.
	if _, err := v.SubscribeRecords(); !errors.Is(err, ErrFeedBusy) {
		t.Fatalf("second subscriber: %v", err)
	}
	f.Close()
	write(10)
	g, err := v.SubscribeRecords()
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	write(11)
	recs, _ = g.Take(nil)
	if len(recs) != 1 || recs[0].LSN != 14 {
		t.Fatalf("new subscriber got %d records (first %+v)", len(recs), recs)
	}
}

// WaitApplied returns once the records are readable, and with the
// volume's error when it has failed.
func TestWaitApplied(t *testing.T) {
	v, _ := newVol(t, 2<<20, 1<<20)
	for i := 0; i < 8; i++ {
		if err := v.WriteAt(pattern(uint64(i), 4096), int64(i)*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.WaitApplied(v.HeadLSN()); err != nil {
		t.Fatal(err)
	}
	v.fail(errors.New("injected"))
	if err := v.WaitApplied(v.HeadLSN() + 1); err == nil {
		t.Fatal("WaitApplied on a failed volume for an LSN never written returned nil")
	}
}

// A record at or below HeadLSN is already in the feed: a flush that reads
// the head and then takes the feed ships everything it waits for.
func TestRecordFeedCoversHead(t *testing.T) {
	v, _ := newVol(t, 4<<20, 2<<20)
	f, err := v.SubscribeRecords()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	stop := make(chan struct{})
	done := make(chan struct{})
	for w := 0; w < 4; w++ {
		go func(w int) {
			defer func() { done <- struct{}{} }()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if err := v.Trim(int64((w*64+i%64)*4096), 4096); err != nil {
					t.Error(err)
					return
				}
			}
		}(w)
	}
	var seen uint64
	var recs []wal.Record
	var failure string
	for i := 0; i < 20000 && failure == ""; i++ {
		h := v.HeadLSN()
		recs, _ = f.Take(recs[:0])
		for _, r := range recs {
			if r.LSN != seen+1 {
				failure = fmt.Sprintf("feed skipped from %d to %d", seen, r.LSN)
			}
			seen = r.LSN
		}
		f.Recycle(recs)
		if seen < h && failure == "" {
			failure = fmt.Sprintf("head %d read before taking the feed, but the feed only had up to %d", h, seen)
		}
	}
	close(stop)
	for w := 0; w < 4; w++ {
		<-done
	}
	if failure != "" {
		t.Fatal(failure)
	}
	t.Logf("%d records checked", seen)
}

// Without a replica to ship to, the feed copies no data: a record comes
// out as its header, marked Elided; a redirected large write comes out as
// the Write it stands for, with its data, once payloads are wanted again.
func TestRecordFeedWithoutPayloads(t *testing.T) {
	v, _ := newVol(t, 4<<20, 1<<20)
	f, err := v.SubscribeRecords()
	if err != nil {
		t.Fatal(err)
	}
	f.SetPayloads(false)
	if err := v.WriteAt(pattern(1, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	big := pattern(2, 256<<10)
	if err := v.WriteAt(big, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	recs, lost := f.Take(nil)
	if lost.From != 0 || len(recs) != 2 {
		t.Fatalf("took %d records, lost %+v", len(recs), lost)
	}
	for _, r := range recs {
		if !Elided(r) || r.Type != wal.Write {
			t.Fatalf("record LSN %d type %v with %d of %d payload bytes: want an elided write", r.LSN, r.Type, len(r.Payload), r.Length)
		}
	}
	f.Recycle(recs)
	f.SetPayloads(true)
	if err := v.WriteAt(big, 2<<20, false); err != nil {
		t.Fatal(err)
	}
	recs, _ = f.Take(nil)
	if len(recs) != 1 || Elided(recs[0]) || recs[0].Type != wal.Write || !bytes.Equal(recs[0].Payload, big) {
		t.Fatalf("took %d records; want the large write with its data", len(recs))
	}
	if v.Stats().RedirectWrites != 2 {
		t.Fatalf("large writes redirected: %d, want 2", v.Stats().RedirectWrites)
	}
}
