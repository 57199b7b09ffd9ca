package blockvol

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
)

// ReplResetHead to a lower LSN leaves slots.syncingLSN at the old,
// higher LSN: a redirect then counts never-synced redirects below it as
// durable and flips onto the chunk's real durable slot.
func TestRedirectAfterResetHeadLower(t *testing.T) {
	cfs := vfs.NewCrashFS()
	const ch = redirChunk
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 1 << 20, FS: cfs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	v.pauseFlusher.Store(true)
	a := fillPattern(ch, 1)
	for i := 0; i < 10; i++ { // LSNs 1-10, synced: syncingLSN = 10
		if err := v.WriteAt(a, int64(i%3)*ch, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	// Truncation of a divergent tail: the log continues at LSN 3.
	if err := v.ReplResetHead(2); err != nil {
		t.Fatal(err)
	}
	b := fillPattern(2*ch, 50)
	if err := v.WriteAt(b, 0, false); err != nil { // LSN 3, chunks 0-1
		t.Fatal(err)
	}
	cc := fillPattern(2*ch, 100)
	if err := v.WriteAt(cc, ch, false); err != nil { // LSN 4, chunks 1-2
		t.Fatal(err)
	}
	t.Logf("redirects %d, syncingLSN %d durLSN %d", v.Stats().RedirectWrites, v.slots.syncingLSN, v.durLSN.Load())
	// The kernel writes the extent's pages back; the log's never reached
	// the disk (no flush was asked).
	if err := v.extF.Sync(); err != nil {
		t.Fatal(err)
	}
	nfs := cfs.PowerCut(vfs.CutOptions{})
	v.fail(errors.New("test: power cut"))
	_ = time.Second
	v2, err := Open("/vol", Options{FS: nfs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	got := make([]byte, 3*ch)
	if err := v2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	r2in1 := bytes.Equal(got[ch:2*ch], cc[:ch])
	r2in2 := bytes.Equal(got[2*ch:3*ch], cc[ch:])
	t.Logf("chunk0 A=%v chunk1 A=%v R2=%v chunk2 A=%v R2=%v", bytes.Equal(got[:ch], a), bytes.Equal(got[ch:2*ch], a), r2in1, bytes.Equal(got[2*ch:], a), r2in2)
	if r2in1 != r2in2 {
		t.Fatalf("the write at LSN 4 is torn across chunks: chunk 1 has it %v, chunk 2 %v", r2in1, r2in2)
	}
}

// settleAll waits for maxPendLSN, which ReplResetHead to a lower LSN does
// not lower: SetEpochRole then waits for an LSN that is never written.
func TestSettleAllAfterResetHeadLower(t *testing.T) {
	v, err := Create(t.TempDir()+"/vol", Options{Size: 1 << 20, WALSize: 1 << 20, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	const ch = redirChunk
	for i := 0; i < 5; i++ { // redirects at LSNs 1-5
		if err := v.WriteAt(fillPattern(2*ch, byte(i)), 0, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.ReplResetHead(1); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(fillPattern(2*ch, 9), 0, false); err != nil { // LSN 2
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- v.SetEpochRole(2, "replica") }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("SetEpochRole hangs: settleAll waits for LSN %d, head is %d", v.slots.maxPendLSN.Load(), v.headLSN.Load())
	}
}
