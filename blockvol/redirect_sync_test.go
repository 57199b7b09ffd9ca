package blockvol

import (
	"bytes"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
)

// A redirect that decides while a WAL sync has chosen (syncingLSN) but
// not finished counts the chosen record as durable and flips onto the
// chunk's durable slot. A power cut before the WAL fdatasync loses the
// chosen record and leaves the flip's data in the slot recovery reads.
func TestRedirectWaitsForAChosenSync(t *testing.T) {
	cfs := vfs.NewCrashFS()
	hfs := &hookFS{CrashFS: cfs}
	const ch = redirChunk
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 1 << 20, FS: hfs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	v.pauseFlusher.Store(true)
	a := fillPattern(ch, 1) // R0: small writes, flushed and checkpointed
	for c := 0; c < 3; c++ {
		if err := v.WriteAt(a, int64(c)*ch, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	b := fillPattern(2*ch, 50) // R1: chunks 0-1
	if err := v.WriteAt(b, 0, false); err != nil {
		t.Fatal(err)
	}
	reached := make(chan struct{})
	release := make(chan struct{})
	walReached := make(chan struct{})
	hfs.set(func(name string) {
		switch name {
		case ShadowFile:
			close(reached)
			<-release
		case WALFile:
			close(walReached)
			select {} // the power goes while the WAL sync runs
		}
	})
	go v.Flush()
	<-reached
	hfs.set(nil)
	cc := fillPattern(2*ch, 100) // R2: chunks 1-2, decides during the sync
	walGo := make(chan struct{})
	var walOnce sync.Once
	hfs.set(func(name string) {
		if name == WALFile {
			walOnce.Do(func() { close(walReached) })
			<-walGo
		}
	})
	r2done := make(chan error, 1)
	go func() { r2done <- v.WriteAt(cc, ch, false) }()
	select { // without a fix R2 completes during the sync; with one it waits for it
	case err := <-r2done:
		if err != nil {
			t.Fatal(err)
		}
		r2done <- nil
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	<-walReached
	nfs := cfs.PowerCut(vfs.CutOptions{})
	v.fail(errors.New("test: power cut"))
	close(walGo)
	<-r2done
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
	for c := 0; c < 3; c++ {
		g := got[c*ch : (c+1)*ch]
		what := "?"
		switch {
		case bytes.Equal(g, a):
			what = "R0 (flushed)"
		case bytes.Equal(g, b[:ch]), bytes.Equal(g, b[ch:]):
			what = "R1"
		case bytes.Equal(g, cc[:ch]), bytes.Equal(g, cc[ch:]):
			what = "R2"
		}
		t.Logf("chunk %d: %s", c, what)
	}
	r2in1 := bytes.Equal(got[ch:2*ch], cc[:ch])
	r2in2 := bytes.Equal(got[2*ch:3*ch], cc[ch:])
	if r2in1 != r2in2 {
		t.Fatalf("R2 torn across chunks: chunk 1 R2=%v, chunk 2 R2=%v", r2in1, r2in2)
	}
	if !r2in1 && !bytes.Equal(got[ch:2*ch], a) && !bytes.Equal(got[ch:2*ch], b[ch:]) {
		t.Fatalf("chunk 1 lost the flushed R0")
	}
}
