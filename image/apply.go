package image

import (
	"errors"
	"fmt"
	"io"
)

// Sink receives an image's content. blockvol's Rewriter has this shape.
type Sink interface {
	WriteAt(p []byte, off int64) error
	Zero(off, length int64) error
}

// Apply writes every record of r to s. With fillGaps (a full image over a
// volume that may hold data), the ranges between data records, up to
// size, are zeroed too, so s reads as the image afterwards. Apply checks
// as it goes, so a caller that must not change s on a bad image verifies
// the whole stream first (Verify) and applies a second read of it.
func Apply(r *Reader, s Sink, fillGaps bool, size int64) error {
	h := r.Header()
	if size < h.Size {
		return fmt.Errorf("image: the image is %d bytes, the target only %d", h.Size, size)
	}
	var pos int64
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if fillGaps && rec.Off > pos {
			if err := s.Zero(pos, rec.Off-pos); err != nil {
				return fmt.Errorf("image: zero [%d, +%d): %w", pos, rec.Off-pos, err)
			}
		}
		if rec.Zero {
			err = s.Zero(rec.Off, rec.Len)
		} else {
			err = s.WriteAt(rec.Data, rec.Off)
		}
		if err != nil {
			return fmt.Errorf("image: apply record at %d (+%d): %w", rec.Off, rec.Len, err)
		}
		pos = rec.Off + rec.Len
	}
	if fillGaps && pos < size {
		if err := s.Zero(pos, size-pos); err != nil {
			return fmt.Errorf("image: zero [%d, +%d): %w", pos, size-pos, err)
		}
	}
	return nil
}
