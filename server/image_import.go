package server

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/image"
	"github.com/blockd/blockd/vfs"
)

// Files an import keeps in the volume's directory (docs/IMAGE-FORMAT.md).
const (
	importStaging = "import-staging.img"
	importMarker  = "IMPORT-PENDING"
	pendingPrefix = "import-pending-"
)

// importing holds the directories of volumes with an import running: one
// import per volume at a time.
var importing sync.Map

// importMark is the content of the IMPORT-PENDING marker: what a restart
// must undo.
type importMark struct {
	Pending string    `json:"pending"`
	Created string    `json:"created,omitempty"` // the source snapshot, once created
	Newer   bool      `json:"-"`                 // roll back: delete every snapshot after Pending
	Started time.Time `json:"started"`
}

// offsetWriter turns a vfs.File into an io.Writer.
type offsetWriter struct {
	f   vfs.File
	off int64
}

func (o *offsetWriter) Write(p []byte) (int, error) {
	n, err := o.f.WriteAt(p, o.off)
	o.off += int64(n)
	if err != nil {
		return n, stageWriteErr{fmt.Errorf("write at %d: %w", o.off, err)}
	}
	return n, nil
}

type offsetReader struct {
	f   vfs.File
	off int64
}

func (o *offsetReader) Read(p []byte) (int, error) {
	n, err := o.f.ReadAt(p, o.off)
	o.off += int64(n)
	if n > 0 && errors.Is(err, io.EOF) {
		err = nil
	}
	return n, err
}

func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, blockdev.ErrNoSpace) || errors.Is(err, syscall.EFBIG)
}

// handleImport receives an image, stages and verifies it whole, checks it
// fits the volume, then applies it (importer.apply).
func (s *Server) handleImport(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	h, p, e := s.primaryFor(name)
	if e != nil {
		writeError(w, e)
		return
	}
	force := r.URL.Query().Get("force") == "1" || r.URL.Query().Get("force") == "true"
	if _, busy := importing.LoadOrStore(h.dir, true); busy {
		writeError(w, imageError(api.CodeBusy, http.StatusConflict, "volume %s: another import is running", name))
		return
	}
	defer importing.Delete(h.dir)
	// A marker left by a crashed import is undone before anything else.
	if err := s.recoverImport(name, h.dir, h.vol, true, p.Flush); err != nil {
		writeError(w, api.Errorf(api.CodeInternal, "volume %s: %v", name, err))
		return
	}
	fs := s.cfg.FS
	stagePath := filepath.Join(h.dir, importStaging)
	_ = fs.Remove(stagePath)
	f, err := fs.OpenFile(stagePath, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		writeError(w, stageError(name, err))
		return
	}
	defer func() {
		f.Close()
		_ = fs.Remove(stagePath)
	}()
	// Stage and verify in one pass: the reader checks what it tees.
	ow := &offsetWriter{f: f}
	hdr, sum, err := image.Verify(io.TeeReader(r.Body, ow))
	if err == nil {
		err = f.Sync()
		if err != nil {
			err = fmt.Errorf("sync: %w", err)
		}
	}
	if err != nil {
		var we stageWriteErr
		if errors.As(err, &we) || isNoSpace(err) {
			writeError(w, stageError(name, err))
			return
		}
		if errors.Is(err, image.ErrCorrupt) || errors.Is(err, image.ErrTruncated) || errors.Is(err, image.ErrVersion) || errors.Is(err, image.ErrNotImage) {
			s.log.Warn("import_refused", "volume", name, "reason", "bad_image", "err", err)
			writeError(w, imageError(api.CodeBadImage, http.StatusBadRequest, "volume %s unchanged: %v", name, err))
			return
		}
		writeError(w, imageError(api.CodeBadImage, http.StatusBadRequest, "volume %s unchanged: receiving the image: %v", name, err))
		return
	}
	res := api.ImportResult{Volume: name, Kind: hdr.Kind.String(), ImageBytes: ow.off,
		DataBytes: int64(sum.DataBytes), ZeroBytes: int64(sum.ZeroBytes), DataRecords: int64(sum.DataRecords),
		ZeroRecords: int64(sum.ZeroRecords), Digest: hex.EncodeToString(sum.Digest[:]), Forced: force}
	fill, reason := checkImportFits(h.vol, hdr, force)
	if reason != "" {
		s.log.Warn("import_refused", "volume", name, "reason", reason, "kind", hdr.Kind.String(), "force", force)
		writeError(w, imageError(api.CodeImageConflict, http.StatusConflict, "volume %s unchanged: %s", name, reason))
		return
	}
	im := importer{s: s, h: h, p: p, hdr: hdr, fill: fill, staged: f}
	err = im.apply()
	// The content changed under the live export's clients (or, on a
	// failure, was restored): cut them off so they reconnect and reread.
	s.nbdSrv.DisconnectExport(name)
	if err != nil {
		if isNoSpace(err) {
			writeError(w, imageError(api.CodeNoSpace, http.StatusInsufficientStorage, "volume %s: import failed and was rolled back: %v", name, err))
			return
		}
		var ce committedErr
		if errors.As(err, &ce) {
			writeError(w, api.Errorf(api.CodeInternal, "volume %s: %v", name, err))
			return
		}
		writeError(w, api.Errorf(api.CodeInternal, "volume %s: import failed and was rolled back: %v", name, err))
		return
	}
	if hdr.SourceName != "" {
		res.Snapshot, res.SnapshotUUID = hdr.SourceName, hdr.SourceUUID
	}
	s.log.Info("import_done", "volume", name, "kind", res.Kind, "image_bytes", res.ImageBytes,
		"data_bytes", res.DataBytes, "zero_bytes", res.ZeroBytes, "snapshot", res.Snapshot, "force", force)
	writeJSON(w, http.StatusOK, res)
}

// stageWriteErr marks a failure to write the staging file (as opposed to a bad
// stream).
type stageWriteErr struct{ error }

func (e stageWriteErr) Unwrap() error { return e.error }

func stageError(vol string, err error) *api.Error {
	var we stageWriteErr
	if errors.As(err, &we) {
		err = we.error // the file's error, not the reader's view of it
	}
	if isNoSpace(err) {
		return imageError(api.CodeNoSpace, http.StatusInsufficientStorage, "volume %s unchanged: staging the image: %v", vol, err)
	}
	return api.Errorf(api.CodeInternal, "volume %s unchanged: staging the image: %v", vol, err)
}

// checkImportFits decides whether a verified image may be applied to vol,
// and whether the gaps of a full image must be zeroed (the volume may hold
// data). A non-empty reason refuses the import, naming the mismatch.
func checkImportFits(vol *blockvol.Volume, h image.Header, force bool) (fill bool, reason string) {
	if h.Size > vol.Size() {
		return false, fmt.Sprintf("the image is of a %d-byte volume, this volume has %d bytes", h.Size, vol.Size())
	}
	if h.BlockSize%vol.BlockSize() != 0 {
		return false, fmt.Sprintf("the image's block size %d is not a multiple of the volume's %d", h.BlockSize, vol.BlockSize())
	}
	snaps := vol.Snapshots()
	if h.SourceUUID != "" {
		for _, sn := range snaps {
			if sn.UUID == h.SourceUUID && !force {
				return false, fmt.Sprintf("already imported: snapshot %q has the image's source uuid %s (give --force to import again)", sn.Name, h.SourceUUID)
			}
		}
	}
	switch h.Kind {
	case image.Full:
		if force {
			return true, ""
		}
		if len(snaps) > 0 {
			return false, fmt.Sprintf("a full image goes only into an empty volume; this one has %d snapshot(s) (%s) (give --force to overwrite)", len(snaps), snapNames(snaps))
		}
		written, err := hasData(vol)
		if err != nil {
			return false, fmt.Sprintf("cannot tell whether the volume is empty: %v", err)
		}
		if written {
			return false, "a full image goes only into an empty volume; this one holds data (give --force to overwrite)"
		}
		return false, ""
	case image.Diff:
		if force {
			return false, ""
		}
		var base *blockvol.SnapshotInfo
		for i := range snaps {
			if snaps[i].Name == h.BaseName {
				base = &snaps[i]
			}
		}
		if base == nil {
			return false, fmt.Sprintf("wrong base: the diff applies on top of snapshot %q (uuid %s), which this volume does not have", h.BaseName, h.BaseUUID)
		}
		if base.UUID != h.BaseUUID {
			return false, fmt.Sprintf("wrong base: snapshot %q here has uuid %s, the diff's base has uuid %s", h.BaseName, base.UUID, h.BaseUUID)
		}
		changed, err := vol.ChangedRanges(base.Name, "")
		if err != nil {
			return false, fmt.Sprintf("cannot tell whether the volume changed since %q: %v", base.Name, err)
		}
		if n := len(changed); n > 0 {
			var bytes int64
			for _, c := range changed {
				bytes += c.Len
			}
			return false, fmt.Sprintf("the volume changed since the diff's base snapshot %q (%d bytes in %d ranges); restore it first or give --force", base.Name, bytes, n)
		}
		if h.SourceName != "" {
			for _, sn := range snaps {
				if sn.Name == h.SourceName {
					return false, fmt.Sprintf("the volume already has a snapshot %q, the diff's source (give --force to replace it)", sn.Name)
				}
			}
		}
		return false, ""
	}
	return false, fmt.Sprintf("image kind %v", h.Kind)
}

func snapNames(snaps []blockvol.SnapshotInfo) string {
	var names []string
	for i, sn := range snaps {
		if i == 3 {
			names = append(names, fmt.Sprintf("and %d more", len(snaps)-3))
			break
		}
		names = append(names, sn.Name)
	}
	return strings.Join(names, ", ")
}

// hasData reports whether any block of vol is allocated.
func hasData(vol *blockvol.Volume) (bool, error) {
	size := vol.Size()
	for off := int64(0); off < size; {
		exts, err := vol.BlockStatus(off, size-off)
		if err != nil {
			return false, err
		}
		if len(exts) == 0 {
			return false, fmt.Errorf("block status at %d: no extents", off)
		}
		for _, e := range exts {
			if !e.Hole && !e.Zero {
				return true, nil
			}
			off = e.Offset + e.Length
		}
	}
	return false, nil
}
