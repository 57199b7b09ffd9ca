package blockvol

import (
	"fmt"

	"github.com/blockd/blockd/blockdev"
)

// Expand grows the volume to newSize bytes. It is a destructive operation
// (docs/ARCHITECTURE.md §3): it runs under Drain, so no I/O is in flight while
// the size changes.
//
// Order for crash safety: the extent grows first (sparse, synced), then the
// superblock records the new size (the commit point). A crash between the
// two leaves an extent longer than the superblock says; Open cuts the
// uncommitted tail off again (nothing was ever written there: writes past
// the committed size are refused). An extent shorter than the superblock
// is corruption and is refused.
func (v *Volume) Expand(newSize int64) error {
	return v.Drain(func() error {
		cur := v.size.Load()
		switch {
		case newSize == cur:
			return nil
		case newSize < cur:
			return fmt.Errorf("blockvol: expand to %d bytes: below the current %d (volumes only grow): %w",
				newSize, cur, blockdev.ErrInvalid)
		case newSize%v.bs != 0:
			return fmt.Errorf("blockvol: expand to %d bytes: not a multiple of the block size %d: %w",
				newSize, v.bs, blockdev.ErrMisaligned)
		}
		if err := v.extF.Truncate(newSize); err != nil {
			return fmt.Errorf("blockvol: expand: grow extent: %w", mapNoSpace(err))
		}
		if err := v.extF.Sync(); err != nil {
			return fmt.Errorf("blockvol: expand: sync extent: %w", ioError(err))
		}
		v.superMu.Lock()
		v.sb.Size = newSize
		err := v.persistSuperblock()
		if err != nil {
			v.sb.Size = cur
		}
		v.superMu.Unlock()
		if err != nil {
			_ = v.extF.Truncate(cur)
			return fmt.Errorf("blockvol: expand: persist size: %w", ioError(err))
		}
		v.size.Store(newSize)
		v.log.Info("engine_expanded", "from", cur, "to", newSize)
		return nil
	})
}

// checkExtentSize reconciles the extent file with the committed size (see
// Expand): a longer extent is an interrupted expand and is cut back; a
// shorter one is refused as corrupt.
func (v *Volume) checkExtentSize(size int64) error {
	st, err := v.extF.Stat()
	if err != nil {
		return err
	}
	switch {
	case st.Size() == size:
		return nil
	case st.Size() < size:
		return fmt.Errorf("%w: extent is %d bytes, superblock says %d", ErrCorrupt, st.Size(), size)
	}
	if err := v.extF.Truncate(size); err != nil {
		return fmt.Errorf("blockvol: cut back an interrupted expand: %w", err)
	}
	if err := v.extF.Sync(); err != nil {
		return fmt.Errorf("blockvol: cut back an interrupted expand: %w", err)
	}
	v.log.Info("engine_expand_rolled_back", "extent_size", st.Size(), "size", size)
	return nil
}
