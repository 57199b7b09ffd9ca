package blockvol

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/blockd/blockd/blockdev"
)

// Expand comes in two forms.
//
// The two-phase form, for a replica set that must change size together:
// PrepareExpand grows the extent and records a pending size in the
// superblock without exposing it (Size stays; writes past it are still
// refused); CommitExpand makes the pending size the volume's size;
// CancelExpand drops it and gives the extent back. Whoever coordinates
// the set (the master) decides between commit and cancel; after a restart
// a pending size stays pending until it does.
//
// The one-step form, Expand, grows a volume that never prepared (a replica
// that rejoins after the set committed).
//
// All of them run under Drain, so no I/O is in flight while sizes change,
// and they go through setSizes, whose order makes every step crash-safe:
// the extent grows (sparse, synced) before the superblock names the larger
// size; the superblock write (one slot, fdatasynced: atomic) is the commit
// point; the extent shrinks only after the superblock no longer names the
// larger size. Open (checkExtentSize) cuts back an extent longer than any
// size the superblock names: nothing was ever written there, because
// writes past the committed size are refused.

// ErrNoPendingExpand: CommitExpand without a matching PrepareExpand.
var ErrNoPendingExpand = errors.New("blockvol: no prepared expand to that size")

// Superblock bytes of the pending expand (inside the checksummed area,
// after the role; zero in superblocks written before the field: none).
const (
	sbPendingSizeOff = 224
	sbPendingIDOff   = 232
)

func (s *superblock) encodeExpand(buf []byte) {
	binary.LittleEndian.PutUint64(buf[sbPendingSizeOff:], uint64(s.PendingSize))
	binary.LittleEndian.PutUint64(buf[sbPendingIDOff:], s.PendingExpandID)
}

func (s *superblock) decodeExpand(buf []byte) {
	s.PendingSize = int64(binary.LittleEndian.Uint64(buf[sbPendingSizeOff:]))
	s.PendingExpandID = binary.LittleEndian.Uint64(buf[sbPendingIDOff:])
}

func (s *superblock) validateExpand() error {
	switch {
	case s.PendingSize == 0 && s.PendingExpandID == 0:
		return nil
	case s.PendingSize <= s.Size || s.PendingSize%int64(s.BlockSize) != 0:
		return fmt.Errorf("pending expand size %d: not a multiple of block size %d above size %d", s.PendingSize, s.BlockSize, s.Size)
	}
	return nil
}

// PendingExpand returns the prepared, uncommitted size and the expand ID
// it was prepared for (0, 0: none).
func (v *Volume) PendingExpand() (size int64, id uint64) {
	v.superMu.Lock()
	defer v.superMu.Unlock()
	return v.sb.PendingSize, v.sb.PendingExpandID
}

// checkGrow validates a size to grow to. Caller is inside Drain.
func (v *Volume) checkGrow(op string, newSize int64) error {
	cur := v.size.Load()
	switch {
	case newSize < cur:
		return fmt.Errorf("blockvol: %s to %d bytes: below the current %d (volumes only grow): %w",
			op, newSize, cur, blockdev.ErrInvalid)
	case newSize%v.bs != 0:
		return fmt.Errorf("blockvol: %s to %d bytes: not a multiple of the block size %d: %w",
			op, newSize, v.bs, blockdev.ErrMisaligned)
	}
	return nil
}

// Expand grows the volume to newSize bytes in one step (no prepare). A
// pending expand is resolved by it: the same size commits it, another
// size replaces it.
func (v *Volume) Expand(newSize int64) error {
	return v.Drain(func() error {
		cur := v.size.Load()
		if newSize == cur {
			return nil
		}
		if err := v.checkGrow("expand", newSize); err != nil {
			return err
		}
		if err := v.setSizes(newSize, 0, 0); err != nil {
			return fmt.Errorf("blockvol: expand: %w", err)
		}
		v.log.Info("engine_expanded", "from", cur, "to", newSize)
		return nil
	})
}

// PrepareExpand grows the extent to newSize and records it as pending for
// expand id; the volume's size does not change. Repeating it (same size and
// id) is a no-op; a different pending expand is replaced.
func (v *Volume) PrepareExpand(newSize int64, id uint64) error {
	return v.Drain(func() error {
		cur := v.size.Load()
		if newSize == cur {
			return fmt.Errorf("blockvol: prepare expand to %d bytes: that is the current size: %w", newSize, blockdev.ErrInvalid)
		}
		if err := v.checkGrow("prepare expand", newSize); err != nil {
			return err
		}
		pend, pid := v.PendingExpand()
		if pend == newSize && pid == id {
			return nil
		}
		if pend != 0 && pend != newSize {
			// Drop the old one first (shrinking the extent back), so no
			// crash can find a pending size longer than the extent.
			if err := v.setSizes(cur, 0, 0); err != nil {
				return fmt.Errorf("blockvol: prepare expand: drop the pending %d: %w", pend, err)
			}
		}
		if err := v.setSizes(cur, newSize, id); err != nil {
			return fmt.Errorf("blockvol: prepare expand: %w", err)
		}
		v.log.Info("engine_expand_prepared", "size", cur, "pending_size", newSize, "expand_id", id, "replaced_pending", pend)
		return nil
	})
}

// CommitExpand makes the pending size newSize the volume's size. Once the
// size is newSize it is a no-op (a repeated commit).
func (v *Volume) CommitExpand(newSize int64) error {
	return v.Drain(func() error {
		cur := v.size.Load()
		pend, pid := v.PendingExpand()
		if cur == newSize && pend == 0 {
			return nil
		}
		if pend != newSize {
			return fmt.Errorf("blockvol: commit expand to %d bytes: pending is %d (size %d): %w", newSize, pend, cur, ErrNoPendingExpand)
		}
		if err := v.setSizes(newSize, 0, 0); err != nil {
			return fmt.Errorf("blockvol: commit expand: %w", err)
		}
		v.log.Info("engine_expand_committed", "from", cur, "to", newSize, "expand_id", pid)
		return nil
	})
}

// CancelExpand drops the pending size (if any) and shrinks the extent back
// to the volume's size.
func (v *Volume) CancelExpand() error {
	return v.Drain(func() error {
		cur := v.size.Load()
		pend, pid := v.PendingExpand()
		if pend == 0 {
			return nil
		}
		if err := v.setSizes(cur, 0, 0); err != nil {
			return fmt.Errorf("blockvol: cancel expand: %w", err)
		}
		v.log.Info("engine_expand_cancelled", "size", cur, "pending_size", pend, "expand_id", pid)
		return nil
	})
}

// setSizes moves the volume to (size, pending) in the crash-safe order
// described above. Caller is inside Drain; size never shrinks.
func (v *Volume) setSizes(size, pending int64, id uint64) error {
	st, err := v.extF.Stat()
	if err != nil {
		return fmt.Errorf("stat extent: %w", ioError(err))
	}
	have, want := st.Size(), max(size, pending)
	if want > have {
		if err := v.extF.Truncate(want); err != nil {
			return fmt.Errorf("grow extent: %w", mapNoSpace(err))
		}
		if err := v.extF.Sync(); err != nil {
			return fmt.Errorf("sync extent: %w", ioError(err))
		}
		// The shadow (sparse) follows; Open sizes it again anyway.
		if err := v.shF.Truncate(want); err != nil {
			return fmt.Errorf("grow shadow: %w", mapNoSpace(err))
		}
		v.growSlots(want)
	}
	v.superMu.Lock()
	old := v.sb
	v.sb.Size, v.sb.PendingSize, v.sb.PendingExpandID = size, pending, id
	err = v.persistSuperblock()
	if err != nil {
		// The slot may or may not have reached the disk: keep the larger
		// extent (Open reconciles it) and the old sizes in memory.
		v.sb.Size, v.sb.PendingSize, v.sb.PendingExpandID = old.Size, old.PendingSize, old.PendingExpandID
	}
	v.superMu.Unlock()
	if err != nil {
		return fmt.Errorf("persist sizes: %w", ioError(err))
	}
	v.size.Store(size)
	v.limit.Store(want)
	if want < have {
		// Best effort: a crash or error here leaves an extent longer than
		// any size the superblock names, which Open cuts back.
		if err := v.extF.Truncate(want); err == nil {
			_ = v.extF.Sync()
		}
		_ = v.shF.Truncate(want)
	}
	return nil
}

// checkExtentSize reconciles the extent file with the sizes the superblock
// names (see setSizes): a longer extent is an interrupted step and is cut
// back to the larger of the size and the pending size; a shorter one is
// refused as corrupt.
func (v *Volume) checkExtentSize(size int64) error {
	want := max(size, v.sb.PendingSize)
	v.limit.Store(want)
	st, err := v.extF.Stat()
	if err != nil {
		return err
	}
	switch {
	case st.Size() == want:
		return nil
	case st.Size() < want:
		return fmt.Errorf("%w: extent is %d bytes, superblock says %d (pending %d)", ErrCorrupt, st.Size(), size, v.sb.PendingSize)
	}
	if err := v.extF.Truncate(want); err != nil {
		return fmt.Errorf("blockvol: cut back an interrupted expand: %w", err)
	}
	if err := v.extF.Sync(); err != nil {
		return fmt.Errorf("blockvol: cut back an interrupted expand: %w", err)
	}
	v.log.Info("engine_expand_rolled_back", "extent_size", st.Size(), "size", size, "pending_size", v.sb.PendingSize)
	return nil
}

// recordLimit bounds the records a replica accepts and recovery replays:
// the size, or a prepared size above it. A prepared replica may receive
// writes past its size once the master committed the expand and the
// primary learned it first; it commits on its own next assignment (and a
// restart in between finds them again in its WAL). Clients never write
// past the committed size (io.go refuses them).
func (v *Volume) recordLimit() int64 {
	return max(v.size.Load(), v.limit.Load())
}
