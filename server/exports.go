package server

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/replication"
)

// exports is the NBD frontend's view of the server: the volumes it is
// primary of, and their snapshots as VOLUME@SNAP (read-only). Any other
// name gets an error that names the primary.
type exports struct{ s *Server }

// ChangedContextPrefix names the metadata context "blockd:changed:SNAP0":
// on VOLUME, the blocks written since snapshot SNAP0; on VOLUME@SNAP, the
// blocks that differ between SNAP0 and SNAP (SNAP0 older than SNAP). A
// block status flag of 1 means changed (its content may differ), 0 that
// it is the same, like qemu's qemu:dirty-bitmap:NAME (docs/SNAPSHOTS.md).
const ChangedContextPrefix = "blockd:changed:"

// stateChanged is the flag of a changed extent.
const stateChanged = 1

func (e exports) Lookup(name string) (nbd.Export, error) {
	volName, snap, isSnap := strings.Cut(name, "@")
	e.s.mu.Lock()
	h := e.s.vols[volName]
	e.s.mu.Unlock()
	if h == nil {
		return nbd.Export{}, fmt.Errorf("volume %q is not hosted on this server (%s)", volName, e.s.cfg.ServerID)
	}
	dev, err := h.device()
	if err != nil {
		return nbd.Export{}, err
	}
	if !isSnap {
		return nbd.Export{Name: name, Device: &liveExport{Device: e.s.meter(name, dev), h: h}, Access: h.access,
			Description: fmt.Sprintf("blockd volume %s (epoch %d, server %s)", name, h.vol.Epoch(), e.s.cfg.ServerID)}, nil
	}
	if err := blockvol.CheckSnapshotName(snap); err != nil {
		return nbd.Export{}, fmt.Errorf("export %q: %w", name, err)
	}
	r, err := h.vol.OpenSnapshot(snap)
	if err != nil {
		return nbd.Export{}, fmt.Errorf("export %q: volume %s: %w", name, volName, err)
	}
	info := r.Info()
	return nbd.Export{Name: name, Device: &snapExport{r: r, h: h}, ReadOnly: true, Access: h.access,
		Release: func() { _ = r.Close() },
		Description: fmt.Sprintf("blockd snapshot %s (lsn %d, taken %s, read-only, server %s)", name, info.LSN,
			info.Created.UTC().Format(time.RFC3339), e.s.cfg.ServerID)}, nil
}

// Names lists the live volumes this server is primary of (snapshots are
// not listed: the empty export name keeps selecting the only volume).
func (e exports) Names() []string {
	e.s.mu.Lock()
	all := make([]string, 0, len(e.s.vols))
	for name := range e.s.vols {
		all = append(all, name)
	}
	e.s.mu.Unlock()
	var names []string
	for _, name := range all {
		if _, ok := e.s.host.Device(name); ok {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names
}

// authority checks that this server is still the volume's primary with
// a live lease (the Primary's write gate), for requests that do not go
// through the Primary.
func (h *hosted) authority() error {
	p, ok := h.host.Primary(h.name)
	if !ok {
		h.mu.Lock()
		ref := h.primary
		h.mu.Unlock()
		return h.notPrimary(ref)
	}
	return p.CheckAuthority()
}

// liveExport is the live volume (its Primary) plus the metadata contexts
// blockd:changed:SNAP0 for every snapshot.
type liveExport struct {
	blockdev.Device
	h *hosted
}

var _ nbd.MetaContexter = (*liveExport)(nil)

func (d *liveExport) MetaContexts() []string {
	var out []string
	for _, s := range d.h.vol.Snapshots() {
		out = append(out, ChangedContextPrefix+s.Name)
	}
	return out
}

func (d *liveExport) MetaBlockStatus(name string, off, length int64) ([]nbd.MetaExtent, error) {
	if p, ok := d.Device.(*replication.Primary); ok {
		if err := p.CheckAuthority(); err != nil {
			return nil, err
		}
	}
	return changedStatus(d.h.vol, name, "", off, length)
}

// snapExport is VOLUME@SNAP: the snapshot's reader, read-only, served
// only while this server is the volume's primary, with the contexts
// blockd:changed:SNAP0 for every older snapshot.
type snapExport struct {
	r *blockvol.SnapshotReader
	h *hosted
}

var (
	_ blockdev.Device   = (*snapExport)(nil)
	_ nbd.MetaContexter = (*snapExport)(nil)
)

func (d *snapExport) Size() int64    { return d.r.Size() }
func (d *snapExport) BlockSize() int { return d.r.BlockSize() }

func (d *snapExport) ReadAt(p []byte, off int64) error {
	if err := d.h.authority(); err != nil {
		return err
	}
	return d.r.ReadAt(p, off)
}

func (d *snapExport) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := d.h.authority(); err != nil {
		return nil, err
	}
	return d.r.BlockStatus(off, length)
}

func (d *snapExport) WriteAt(p []byte, off int64, fua bool) error { return d.r.WriteAt(p, off, fua) }
func (d *snapExport) Flush() error                                { return d.r.Flush() }
func (d *snapExport) Trim(off, length int64) error                { return d.r.Trim(off, length) }
func (d *snapExport) WriteZeroes(off, length int64, punch bool) error {
	return d.r.WriteZeroes(off, length, punch)
}

func (d *snapExport) MetaContexts() []string {
	me := d.r.Info()
	var out []string
	for _, s := range d.h.vol.Snapshots() {
		if s.LSN < me.LSN {
			out = append(out, ChangedContextPrefix+s.Name)
		}
	}
	return out
}

func (d *snapExport) MetaBlockStatus(name string, off, length int64) ([]nbd.MetaExtent, error) {
	if err := d.h.authority(); err != nil {
		return nil, err
	}
	return changedStatus(d.h.vol, name, d.r.Info().Name, off, length)
}

// changedStatus answers blockd:changed:FROM over [off, off+length): the
// engine's changed ranges between snapshot FROM and to ("" the live
// volume) as flag-1 extents, the rest flag 0.
func changedStatus(vol *blockvol.Volume, context, to string, off, length int64) ([]nbd.MetaExtent, error) {
	from, ok := strings.CutPrefix(context, ChangedContextPrefix)
	if !ok {
		return nil, fmt.Errorf("unknown metadata context %q: %w", context, blockdev.ErrInvalid)
	}
	ranges, err := vol.ChangedRanges(from, to)
	if err != nil {
		return nil, fmt.Errorf("metadata context %q: %w", context, err)
	}
	return changedExtents(ranges, off, length), nil
}

// changedExtents covers [off, off+length) with the ranges (sorted,
// merged) as changed extents and the gaps between them as unchanged.
func changedExtents(ranges []blockvol.Range, off, length int64) []nbd.MetaExtent {
	end := off + length
	i := sort.Search(len(ranges), func(i int) bool { return ranges[i].Off+ranges[i].Len > off })
	var out []nbd.MetaExtent
	pos := off
	for ; i < len(ranges) && pos < end; i++ {
		r := ranges[i]
		if r.Off >= end {
			break
		}
		if r.Off > pos {
			out = append(out, nbd.MetaExtent{Offset: pos, Length: r.Off - pos})
			pos = r.Off
		}
		e := min(r.Off+r.Len, end)
		if e > pos {
			out = append(out, nbd.MetaExtent{Offset: pos, Length: e - pos, Flags: stateChanged})
			pos = e
		}
	}
	if pos < end {
		out = append(out, nbd.MetaExtent{Offset: pos, Length: end - pos})
	}
	return out
}
