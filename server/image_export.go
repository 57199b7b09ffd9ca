package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/image"
)

// exportPiece is one run of the export plan: data to read, or a range
// that reads as zeroes.
type exportPiece struct {
	off, n int64
	zero   bool
}

// exportPieceMax bounds one read of the export (a multiple of the chunk
// size, far below blockdev.MaxIOSize).
const exportPieceMax = 4 << 20

// handleExport streams an image of ?snap=S (the live volume through a
// temporary snapshot when absent), a diff against ?since=S0 when given.
func (s *Server) handleExport(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	h, _, e := s.primaryFor(name)
	if e != nil {
		writeError(w, e)
		return
	}
	vol := h.vol
	snap, since := r.URL.Query().Get("snap"), r.URL.Query().Get("since")
	for _, n := range []string{snap, since} {
		if n != "" {
			if err := blockvol.CheckSnapshotName(n); err != nil {
				writeError(w, api.Errorf(api.CodeBadRequest, "%v", err))
				return
			}
		}
	}
	live := snap == ""
	if live {
		snap = tempSnapName("export-")
		if _, err := vol.CreateSnapshot(snap, blockvol.SnapshotOptions{}); err != nil {
			writeError(w, imageSnapError(name, snap, err))
			return
		}
		s.log.Info("export_temp_snapshot", "volume", name, "snapshot", snap)
		defer func() {
			if err := vol.DeleteSnapshot(snap); err != nil {
				s.log.Warn("export_temp_snapshot_left", "volume", name, "snapshot", snap, "err", err)
			}
		}()
	}
	src, err := vol.OpenSnapshot(snap)
	if err != nil {
		writeError(w, imageSnapError(name, snap, err))
		return
	}
	defer src.Close()
	info := src.Info()
	hdr := image.Header{Kind: image.Full, BlockSize: vol.BlockSize(), Size: info.SizeBytes, Volume: name}
	if !live {
		hdr.SourceName, hdr.SourceUUID = info.Name, info.UUID
	}
	var plan []exportPiece
	if since != "" {
		base, err := vol.SnapshotInfo(since)
		if err != nil {
			writeError(w, imageSnapError(name, since, err))
			return
		}
		if base.LSN >= info.LSN {
			writeError(w, api.Errorf(api.CodeBadRequest, "volume %s: --since snapshot %q is not older than the exported snapshot (LSN %d, exported %d)", name, since, base.LSN, info.LSN))
			return
		}
		hdr.Kind, hdr.BaseName, hdr.BaseUUID = image.Diff, base.Name, base.UUID
		changed, err := vol.ChangedRanges(since, snap)
		if err != nil {
			writeError(w, imageSnapError(name, since, err))
			return
		}
		for _, c := range changed {
			if plan, err = planExtents(src, plan, c.Off, min(c.Off+c.Len, info.SizeBytes)); err != nil {
				break
			}
		}
		if err != nil {
			writeError(w, api.Errorf(api.CodeInternal, "volume %s: export: %v", name, err))
			return
		}
	} else if plan, err = planExtents(src, nil, 0, info.SizeBytes); err != nil {
		writeError(w, api.Errorf(api.CodeInternal, "volume %s: export: %v", name, err))
		return
	}
	var est int64 = 1024
	for _, p := range plan {
		if p.zero {
			est += 36
		} else {
			est += p.n + 36*(p.n/image.DefaultChunkSize+1)
		}
	}
	w.Header().Set("Content-Type", api.ImageContentType)
	w.Header().Set(api.HeaderImageEstimate, strconv.FormatInt(est, 10))
	w.WriteHeader(http.StatusOK)
	iw, err := image.NewWriter(w, hdr)
	if err == nil {
		err = streamPlan(r.Context(), src, iw, plan)
	}
	var sum image.Summary
	if err == nil {
		sum, err = iw.Close()
	}
	if err != nil {
		// The status is sent: cut the stream so the client sees an image
		// without its trailer, which no reader accepts.
		s.log.Warn("export_failed", "volume", name, "snapshot", snap, "since", since, "err", err)
		panic(http.ErrAbortHandler)
	}
	s.log.Info("export_done", "volume", name, "snapshot", snap, "since", since, "kind", hdr.Kind.String(),
		"data_bytes", sum.DataBytes, "zero_bytes", sum.ZeroBytes, "records", sum.DataRecords+sum.ZeroRecords)
}

// planExtents appends to plan the runs of [off, end) of dev: allocated
// data to read and holes (or known zeroes) that read as zero.
func planExtents(dev blockdev.Device, plan []exportPiece, off, end int64) ([]exportPiece, error) {
	for off < end {
		exts, err := dev.BlockStatus(off, end-off)
		if err != nil {
			return plan, fmt.Errorf("block status at %d: %w", off, err)
		}
		if len(exts) == 0 {
			return plan, fmt.Errorf("block status at %d: no extents", off)
		}
		for _, e := range exts {
			s, t := max(e.Offset, off), min(e.Offset+e.Length, end)
			if t <= s {
				continue
			}
			zero := e.Hole || e.Zero
			if n := len(plan); n > 0 && plan[n-1].zero == zero && plan[n-1].off+plan[n-1].n == s {
				plan[n-1].n += t - s
			} else {
				plan = append(plan, exportPiece{off: s, n: t - s, zero: zero})
			}
			off = t
		}
	}
	return plan, nil
}

// streamPlan reads the plan's data from src one piece ahead of the writer
// (the read of the next piece overlaps the encoding and sending of this
// one).
func streamPlan(ctx context.Context, src blockdev.Device, iw *image.Writer, plan []exportPiece) error {
	type piece struct {
		off int64
		buf []byte
		err error
	}
	ctx, cancel := context.WithCancel(ctx)
	stopped := make(chan struct{})
	defer func() {
		cancel()
		<-stopped // no read of src outlives the call (src is closed next)
	}()
	free := make(chan []byte, 3)
	for range 3 {
		free <- make([]byte, exportPieceMax)
	}
	full := make(chan piece, 2)
	go func() {
		defer close(stopped)
		defer close(full)
		for _, p := range plan {
			if p.zero {
				continue
			}
			for off, end := p.off, p.off+p.n; off < end; {
				n := min(end-off, exportPieceMax-off%exportPieceMax)
				var buf []byte
				select {
				case buf = <-free:
				case <-ctx.Done():
					return
				}
				buf = buf[:n]
				err := src.ReadAt(buf, off)
				if err != nil {
					err = fmt.Errorf("read [%d, +%d): %w", off, n, err)
				}
				select {
				case full <- piece{off: off, buf: buf, err: err}:
				case <-ctx.Done():
					return
				}
				if err != nil {
					return
				}
				off += n
			}
		}
	}()
	for _, p := range plan {
		if p.zero {
			if err := iw.Zero(p.off, p.n); err != nil {
				return err
			}
			continue
		}
		for done := int64(0); done < p.n; {
			pc, ok := <-full
			if !ok {
				if err := ctx.Err(); err != nil {
					return fmt.Errorf("export cancelled: %w", err)
				}
				return errors.New("export reader stopped early")
			}
			if pc.err != nil {
				return pc.err
			}
			if err := iw.Data(pc.off, pc.buf); err != nil {
				return err
			}
			done += int64(len(pc.buf))
			free <- pc.buf[:cap(pc.buf)]
		}
	}
	return nil
}
