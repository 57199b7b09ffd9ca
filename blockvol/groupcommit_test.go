package blockvol

import (
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
)

// TestGroupCommitFailedSyncFailsWaiters: flushes waiting for a WAL sync
// that fails must fail too. The failed fdatasync's error is reported once;
// the next one on the file succeeds whether or not the pages reached the
// disk (fsyncgate), so a waiter that led that next sync would promise
// records the failed one may have lost. The trace hook holds the failing
// sync until the others wait, and then after it has woken them.
func TestGroupCommitFailedSyncFailsWaiters(t *testing.T) {
	fs := vfs.NewCrashFS()
	v, err := Create("/vol", Options{Size: 1 << 20, WALSize: 1 << 20, FS: fs, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	v.pauseFlusher.Store(true) // no sync but the flushes'
	if err := v.WriteAt(pattern(1, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	const waiters = 4
	var syncing atomic.Bool
	var queued sync.WaitGroup
	queued.Add(waiters)
	leading := make(chan struct{})
	v.trace = func(format string, args ...any) {
		switch {
		case strings.HasPrefix(format, "sync lsn=") && syncing.CompareAndSwap(false, true):
			close(leading)
			queued.Wait() // every waiter has written and called Flush
			time.Sleep(20 * time.Millisecond)
		case strings.HasPrefix(format, "sync done") && args[1] != nil:
			// The failed sync woke its waiters: give them the time to
			// run a sync of their own, should they try.
			time.Sleep(50 * time.Millisecond)
		}
	}
	fs.Inject(vfs.Fault{Op: vfs.OpSync, Name: WALFile, Count: 1, Err: syscall.EIO})
	if err := v.WriteAt(pattern(2, 4096), 4096, false); err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, waiters+1)
	go func() { errs <- v.Flush() }()
	<-leading
	for i := 0; i < waiters; i++ {
		go func(i int) {
			err := v.WriteAt(pattern(uint64(3+i), 4096), int64(2+i)*4096, false)
			queued.Done()
			if err == nil {
				err = v.Flush()
			}
			errs <- err
		}(i)
	}
	for i := 0; i < waiters+1; i++ {
		if err := <-errs; err == nil {
			t.Fatal("a flush waiting for a failed WAL sync returned success")
		}
	}
}
