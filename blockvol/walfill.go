package blockvol

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/blockd/blockd/vfs"
)

// Zero-filling the WAL.
//
// Create reserves the WAL with fallocate, so appends never hit ENOSPC and
// a full disk shows at create, quickly. But fallocate leaves unwritten
// extents: the first write into each one must also convert it to written,
// a metadata change the next fdatasync commits to the file system's
// journal. On the first lap of the log every Flush pays for that. Measured
// on ext4 with plain pwrites of 4,136-byte records and an fdatasync every
// 32: 7.06 µs per record on a fresh fallocated file against 4.52 µs on a
// file written once (5.11 against 3.17 with concurrent writers). Databases
// zero-fill their logs at creation for this reason.
//
// The fill runs in the background, started by Open, rather than inside
// Create: the server creates the volumes the master assigns inline in its
// heartbeat loop, and a synchronous fill of a 1 GiB (or 2 GiB) WAL costs
// one to several seconds of disk time per volume, longer on a busy disk, a
// pause that can cost the server its leases. In the background it costs
// the first seconds of a new volume some bandwidth instead.
//
// Why it never races an append: the filler writes only at or past v.head,
// the position where the next record will be reserved, and only while the
// head is still in the first lap (head < walSize: logical positions start
// at 0 at create and only grow, so physical [head, walSize) is free space,
// ahead of every record ever reserved). It reads the head and writes each
// piece while holding appendMu, the lock every reservation takes before it
// moves the head, so no record can be reserved in the piece while its
// zeros are written; records reserved earlier lie below the head. The
// pieces are small (fillChunk, a page-cache copy of tens of µs), so a
// writer waits at most one piece for the lock. Once the head leaves the
// first lap, the records themselves have written the file and the fill
// stops. Every fill write and sync runs under ioMu shared and after a
// check of closed, like any I/O: Close and Drain (which take ioMu
// exclusively) wait for the piece in flight, and the filler touches no
// file once Close has begun.
//
// Why it is crash-safe: zeros past the head are what an unwritten extent
// reads as anyway. wal.Scan stops at the first record that does not check
// out and reports an all-zero header as unwritten space
// (ScanResult.Unwritten), so recovery finds the same end whether a piece
// was written, synced, lost or torn by a power cut; the only thing zeros
// can replace past the head on the first lap is the torn or stale tail of
// an earlier life, which recovery already ignores.
//
// Syncs: the filler calls fdatasync on the WAL after every fillSyncBytes,
// so the group commit's fdatasync (which writes every dirty page of the
// file) never has more than that of zeros to write besides its records. A
// failed fdatasync fails the volume, as one of the group commit does:
// after it the state of any record's dirty page is unknown (fsyncgate),
// and the error is reported once per descriptor, so a later sync of the
// group commit on the same file would not see it.
//
// Once the fill has reached the end of the file and synced, the empty
// file WALFilledFile records it, so a later Open does not fill again. An
// interrupted fill (Close, crash) starts over from the head at the next
// Open. A volume whose head has left the first lap is not filled.
//
// Only the real file system is filled: an in-memory or fault-injecting FS
// (vfs.CrashFS, vfs.ErrorFS) has no unwritten extents to convert, and
// their tests count and fail WAL writes and syncs, which a background
// writer would take from them. A test FS that wants the fill says so with
// a method ZeroFillWAL() bool returning true (walfill_test.go).
const (
	// WALFilledFile (empty) marks a WAL that has been written once.
	WALFilledFile = "wal.filled"

	fillChunk     = 256 << 10
	fillSyncBytes = 8 << 20
)

// fillZeros is the source of every fill write (read only).
var fillZeros = make([]byte, fillChunk)

// walFill is the filler's state, in Volume.
type walFill struct {
	done chan struct{} // closed when the filler has finished or stopped
}

// fillWanted reports whether the WAL on fs is zero-filled.
func fillWanted(fs vfs.FS) bool {
	if z, ok := fs.(interface{ ZeroFillWAL() bool }); ok {
		return z.ZeroFillWAL()
	}
	return fs == vfs.Default
}

// startWALFill starts the filler if the WAL may still hold unwritten
// space (called by Open, after recovery).
func (v *Volume) startWALFill() {
	v.fill.done = make(chan struct{})
	v.appendMu.Lock()
	from := v.head
	v.appendMu.Unlock()
	if !fillWanted(v.fs) || from >= uint64(v.walSize) {
		close(v.fill.done)
		return
	}
	if _, err := v.fs.Stat(filepath.Join(v.dir, WALFilledFile)); err == nil {
		close(v.fill.done)
		return
	}
	go v.fillWAL(from)
}

// WALFilled is closed once the WAL fill started by Open has finished or
// stopped (at once when there is none). Benchmarks wait for it so that the
// fill does not share the disk with what they measure.
func (v *Volume) WALFilled() <-chan struct{} { return v.fill.done }

func (v *Volume) fillWAL(from uint64) {
	defer close(v.fill.done)
	t0 := time.Now()
	size := uint64(v.walSize)
	v.log.Info("wal_fill_started", "from", from, "bytes", size-from)
	var filled, unsynced int64
	pos := from
	stopped := func(reason string, err error) {
		args := []any{"reason", reason, "pos", pos, "bytes_filled", filled, "duration", time.Since(t0)}
		if err != nil {
			args = append(args, "err", err)
		}
		v.log.Info("wal_fill_stopped", args...)
	}
	for {
		select {
		case <-v.stop:
			stopped("closed", nil)
			return
		default:
		}
		v.ioMu.RLock()
		if v.closed.Load() {
			v.ioMu.RUnlock()
			stopped("closed", nil)
			return
		}
		if v.failed.Load() != nil {
			v.ioMu.RUnlock()
			stopped("volume_failed", nil)
			return
		}
		n, end, err := v.fillPieceLocked(pos, size)
		if err != nil {
			v.ioMu.RUnlock()
			// Zeros past the head protect nothing: a failed one loses no
			// record, and the append that next writes there reports its
			// own error.
			stopped("write_failed", err)
			return
		}
		pos = end
		filled += n
		unsynced += n
		if pos >= size || unsynced >= fillSyncBytes {
			if err := v.walF.Sync(); err != nil {
				v.ioMu.RUnlock()
				v.fail(fmt.Errorf("sync WAL (zero fill): %w", err))
				stopped("sync_failed", err)
				return
			}
			unsynced = 0
		}
		if pos >= size {
			err := v.markWALFilled()
			v.ioMu.RUnlock()
			if err != nil {
				stopped("mark_failed", err)
				return
			}
			v.log.Info("wal_fill_done", "bytes_filled", filled, "duration", time.Since(t0))
			return
		}
		v.ioMu.RUnlock()
	}
}

// fillPieceLocked (ioMu held shared) writes zeros from max(pos, head) to
// the next fillChunk boundary, under appendMu; it returns the bytes
// written and where the fill continues (size once the head has left the
// first lap).
func (v *Volume) fillPieceLocked(pos, size uint64) (int64, uint64, error) {
	v.appendMu.Lock()
	defer v.appendMu.Unlock()
	if v.head >= size {
		return 0, size, nil
	}
	lo := max(pos, v.head)
	hi := min((lo/fillChunk+1)*fillChunk, size)
	if _, err := v.walF.WriteAt(fillZeros[:hi-lo], int64(lo)); err != nil {
		return 0, lo, fmt.Errorf("zero fill of the WAL at %d: %w", lo, err)
	}
	return int64(hi - lo), hi, nil
}

// markWALFilled creates WALFilledFile durably (ioMu held shared).
func (v *Volume) markWALFilled() error {
	name := filepath.Join(v.dir, WALFilledFile)
	f, err := v.fs.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", name, err)
	}
	if err := v.fs.SyncDir(v.dir); err != nil {
		return fmt.Errorf("sync directory %s: %w", v.dir, err)
	}
	return nil
}
