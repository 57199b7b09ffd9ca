package blockvol

// The snapshot seam: the types and methods the server, the NBD export of
// VOLUME@SNAP, images (export, import, clone) and replication build on.
// The engine behind them lives in snapshot*.go.

import (
	"errors"
	"fmt"
	"time"
)

// SnapshotInfo describes one snapshot of a volume.
type SnapshotInfo struct {
	// ID is unique within the volume and never reused.
	ID uint64 `json:"id"`
	// UUID identifies the snapshot's content across volumes: an image
	// exported from it carries it, and an import that creates a snapshot
	// gives it the image's UUID, so a later diff can check its base.
	UUID string `json:"uuid"`
	Name string `json:"name"`
	// LSN is the LSN of the snapshot's record: the snapshot holds the
	// effect of every record with a lower LSN and of none with a higher.
	LSN     uint64    `json:"lsn"`
	Created time.Time `json:"created"`
	// SizeBytes is the volume's size when the snapshot was taken.
	SizeBytes int64 `json:"size_bytes"`
	// HeldBytes is the space the snapshot's preserved blocks take.
	HeldBytes int64 `json:"held_bytes"`
}

// SnapshotOptions tune CreateSnapshot.
type SnapshotOptions struct {
	// UUID to record; empty makes a new random one.
	UUID string
}

// Range is a byte range of a volume.
type Range struct{ Off, Len int64 }

var (
	ErrSnapshotExists   = errors.New("snapshot already exists")
	ErrSnapshotNotFound = errors.New("no such snapshot")
	ErrSnapshotName     = errors.New("invalid snapshot name")
	// ErrSnapshotBusy: the snapshot is open (NBD export, image export)
	// and cannot be deleted until its readers close it.
	ErrSnapshotBusy = errors.New("snapshot is in use")
)

// MaxSnapshotName is the longest snapshot name accepted.
const MaxSnapshotName = 64

// CheckSnapshotName reports why name cannot name a snapshot: it must be 1
// to MaxSnapshotName characters of [A-Za-z0-9._-], start with a letter or
// digit, and so never contain '@' (the NBD export name VOLUME@SNAP) or '/'.
// The error wraps ErrSnapshotName.
func CheckSnapshotName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty", ErrSnapshotName)
	}
	if len(name) > MaxSnapshotName {
		return fmt.Errorf("%w: %d characters, at most %d", ErrSnapshotName, len(name), MaxSnapshotName)
	}
	for i, c := range name {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !ok && i > 0 {
			ok = c == '.' || c == '_' || c == '-'
		}
		if !ok {
			if i == 0 {
				return fmt.Errorf("%w: %q must start with a letter or digit", ErrSnapshotName, name)
			}
			return fmt.Errorf("%w: %q has %q at %d (allowed: letters, digits, '.', '_', '-')", ErrSnapshotName, name, c, i)
		}
	}
	return nil
}
