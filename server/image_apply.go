package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/image"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/vfs"
)

// importer applies one verified, staged image to a volume, atomically
// across a crash: a pending snapshot and a durable marker are taken before
// the first write, and any failure (now, or a crash found at the next
// start) restores the pending snapshot.
type importer struct {
	s      *Server
	h      *hosted
	p      *replication.Primary
	hdr    image.Header
	fill   bool
	staged vfs.File
}

func (im *importer) markerPath() string { return filepath.Join(im.h.dir, importMarker) }

func writeMark(fs vfs.FS, path string, m importMark) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	return vfs.WriteFileAtomic(fs, path, append(b, '\n'), 0o644)
}

// apply: pending snapshot, marker, rewrite, flush (durability rule),
// source snapshot, pending snapshot deleted (the commit), marker removed.
// The flushes are the Primary's (gated by authority, durable per the
// volume's durability mode).
func (im *importer) apply() (err error) {
	vol, name, fs := im.h.vol, im.h.name, im.s.cfg.FS
	flush := im.p.Flush
	mark := importMark{Pending: tempSnapName(pendingPrefix), Started: time.Now().UTC()}
	if _, err := vol.CreateSnapshot(mark.Pending, blockvol.SnapshotOptions{}); err != nil {
		return fmt.Errorf("pending snapshot: %w", err)
	}
	if err := writeMark(fs, im.markerPath(), mark); err != nil {
		_ = vol.DeleteSnapshot(mark.Pending)
		return fmt.Errorf("import marker: %w", err)
	}
	im.s.log.Info("import_started", "volume", name, "pending_snapshot", mark.Pending, "kind", im.hdr.Kind.String(), "fill", im.fill)
	defer func() {
		var ce committedErr
		if err == nil || errors.As(err, &ce) {
			return
		}
		if rerr := rollbackImport(im.s, name, im.h.dir, vol, mark, flush); rerr != nil {
			err = fmt.Errorf("%w; rolling back also failed: %v (the marker stays; the next start retries)", err, rerr)
		}
	}()
	err = vol.Rewrite(func(w blockvol.Rewriter) error {
		rd, err := image.NewReader(&offsetReader{f: im.staged})
		if err != nil {
			return fmt.Errorf("re-read staged image: %w", err)
		}
		return image.Apply(rd, w, im.fill, vol.Size())
	})
	if err != nil {
		return fmt.Errorf("apply: %w", err)
	}
	if err := flush(); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	if src := im.hdr.SourceName; src != "" {
		if _, err := vol.SnapshotInfo(src); err == nil {
			// --force over a snapshot of that name: it is replaced.
			if err := vol.DeleteSnapshot(src); err != nil {
				return fmt.Errorf("replace snapshot %q: %w", src, err)
			}
		}
		mark.Created = src
		if err := writeMark(fs, im.markerPath(), mark); err != nil {
			return fmt.Errorf("import marker: %w", err)
		}
		// The Primary's create returns once the snapshot is durable per
		// the durability mode.
		if _, err := im.p.CreateSnapshot(src, blockvol.SnapshotOptions{UUID: im.hdr.SourceUUID}); err != nil {
			return fmt.Errorf("snapshot %q: %w", src, err)
		}
	}
	// Commit point: the pending snapshot goes (a record in LSN order, so
	// a replica that takes over sees the same commit), durable per the
	// durability mode. A crash from here on keeps the import.
	if err := im.p.DeleteSnapshot(mark.Pending); err != nil {
		if _, serr := vol.SnapshotInfo(mark.Pending); errors.Is(serr, blockvol.ErrSnapshotNotFound) {
			// Deleted here but not durable on the replicas: the import
			// stands on this primary; say so rather than roll back.
			_ = fs.Remove(im.markerPath())
			return committedErr{fmt.Errorf("the import is applied on the primary, but its commit is not durable on the replicas: %w", err)}
		}
		return fmt.Errorf("commit (delete pending snapshot %q): %w", mark.Pending, err)
	}
	if err := fs.Remove(im.markerPath()); err != nil {
		im.s.log.Warn("import_marker_left", "volume", name, "err", err)
	} else if err := fs.SyncDir(im.h.dir); err != nil {
		im.s.log.Warn("import_marker_sync_failed", "volume", name, "err", err)
	}
	return nil
}

// committedErr: the import failed after its commit point; there is
// nothing to roll back.
type committedErr struct{ error }

func (e committedErr) Unwrap() error { return e.error }

// rollbackImport restores the pending snapshot of an interrupted import,
// deletes what the import created (m.Created, and with m.Newer every
// snapshot taken after the pending one), then the marker and the pending
// snapshot. flush makes the restore durable (the Primary's during an
// import, the engine's at open).
func rollbackImport(s *Server, name, dir string, vol *blockvol.Volume, m importMark, flush func() error) error {
	pending, err := vol.SnapshotInfo(m.Pending)
	if err != nil {
		return fmt.Errorf("pending snapshot %q: %w", m.Pending, err)
	}
	if err := vol.RestoreSnapshot(m.Pending); err != nil {
		return fmt.Errorf("restore %q: %w", m.Pending, err)
	}
	if err := flush(); err != nil {
		return fmt.Errorf("flush after restore: %w", err)
	}
	var deleted []string
	for _, sn := range vol.Snapshots() {
		if sn.Name == m.Created || (m.Newer && sn.LSN > pending.LSN) {
			if err := vol.DeleteSnapshot(sn.Name); err != nil && !errors.Is(err, blockvol.ErrSnapshotNotFound) {
				return fmt.Errorf("delete %q: %w", sn.Name, err)
			}
			deleted = append(deleted, sn.Name)
		}
	}
	if err := s.cfg.FS.Remove(filepath.Join(dir, importMarker)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove marker: %w", err)
	}
	_ = s.cfg.FS.SyncDir(dir)
	if err := vol.DeleteSnapshot(m.Pending); err != nil {
		s.log.Warn("import_pending_snapshot_left", "volume", name, "snapshot", m.Pending, "err", err)
	}
	s.log.Info("import_rolled_back", "volume", name, "pending_snapshot", m.Pending, "deleted_snapshots", deleted)
	return nil
}

// recoverImport undoes an import a crash interrupted and removes a
// staging file left behind. Its marker says so on the server that ran
// the import: the server checks when it opens a volume, and an import
// checks before it starts. An import's pending snapshot without a marker
// is an import whose primary died (the snapshot came here by
// replication, the marker did not): onPrimary (an import about to start
// on the primary, which holds the volume's import lock) rolls that back
// too, deleting the snapshots taken after it. A replica never does: the
// primary may be importing right now.
func (s *Server) recoverImport(name, dir string, vol *blockvol.Volume, onPrimary bool, flush func() error) error {
	fs := s.cfg.FS
	if err := fs.Remove(filepath.Join(dir, importStaging)); err == nil {
		s.log.Info("import_staging_removed", "volume", name)
	}
	b, err := vfs.ReadFile(fs, filepath.Join(dir, importMarker))
	if errors.Is(err, os.ErrNotExist) {
		if !onPrimary {
			return nil
		}
		for _, sn := range vol.Snapshots() {
			if strings.HasPrefix(sn.Name, pendingPrefix) {
				s.log.Info("import_interrupted", "volume", name, "pending_snapshot", sn.Name, "marker", false)
				if err := rollbackImport(s, name, dir, vol, importMark{Pending: sn.Name, Newer: true}, flush); err != nil {
					return err
				}
				break
			}
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("read import marker: %w", err)
	}
	var m importMark
	if err := json.Unmarshal(b, &m); err != nil || m.Pending == "" {
		return fmt.Errorf("import marker %s is unreadable (%q): remove it after checking the volume", filepath.Join(dir, importMarker), b)
	}
	if _, err := vol.SnapshotInfo(m.Pending); errors.Is(err, blockvol.ErrSnapshotNotFound) {
		// The marker is written only once the pending snapshot is
		// durable, and the snapshot's deletion is the commit: the import
		// committed and only the marker's removal was lost.
		_ = fs.Remove(filepath.Join(dir, importMarker))
		s.log.Info("import_marker_removed", "volume", name, "pending_snapshot", m.Pending, "note", "the import had committed")
		return nil
	}
	s.log.Info("import_interrupted", "volume", name, "pending_snapshot", m.Pending, "started", m.Started, "marker", true)
	return rollbackImport(s, name, dir, vol, m, flush)
}
