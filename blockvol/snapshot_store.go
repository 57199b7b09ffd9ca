package blockvol

// The snapshot files: one metadata file listing the snapshots, and one
// copy-on-write file per snapshot holding the pre-images of the blocks
// the flusher overwrote after it. See snapshot.go for the design.

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

// File names of the snapshot state inside a volume directory.
const (
	// SnapshotMetaFile lists the snapshots (JSON, replaced atomically).
	SnapshotMetaFile = "snapshots"
	snapMetaTmp      = SnapshotMetaFile + ".tmp"
	snapMetaVersion  = 1
)

// SnapshotFile is the name of snapshot id's copy-on-write file.
func SnapshotFile(id uint64) string { return fmt.Sprintf("snap-%d.cow", id) }

// snapMeta is the content of SnapshotMetaFile.
type snapMeta struct {
	Version   int            `json:"version"`
	NextID    uint64         `json:"next_id"`
	Snapshots []SnapshotInfo `json:"snapshots"`
	// Deleted: snapshots whose deletion is committed but whose file may
	// still exist (a crash between the commit and the remove); Open
	// removes them.
	Deleted []uint64 `json:"deleted,omitempty"`
}

func (v *Volume) loadSnapMeta() (snapMeta, error) {
	var m snapMeta
	b, err := vfs.ReadFile(v.fs, filepath.Join(v.dir, SnapshotMetaFile))
	if errors.Is(err, os.ErrNotExist) {
		return snapMeta{Version: snapMetaVersion, NextID: 1}, nil
	}
	if err != nil {
		return m, fmt.Errorf("read snapshot metadata: %w", err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return m, fmt.Errorf("%w: snapshot metadata: %v", ErrCorrupt, err)
	}
	if m.Version != snapMetaVersion {
		return m, fmt.Errorf("%w: snapshot metadata version %d not supported", ErrCorrupt, m.Version)
	}
	if m.NextID == 0 {
		m.NextID = 1
	}
	return m, nil
}

// stageSnapMeta writes the metadata for list to the temporary file and
// syncs it: the step that needs space, done before a snapshot record is
// appended. commitSnapMeta then renames it into place.
func (v *Volume) stageSnapMeta(list []*snapshot, nextID uint64, deleted []uint64) error {
	m := snapMeta{Version: snapMetaVersion, NextID: nextID, Deleted: deleted, Snapshots: make([]SnapshotInfo, 0, len(list))}
	for _, s := range list {
		in := s.info
		in.HeldBytes = 0
		m.Snapshots = append(m.Snapshots, in)
	}
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	tmp := filepath.Join(v.dir, snapMetaTmp)
	_ = v.fs.Remove(tmp)
	f, err := v.fs.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("stage snapshot metadata: %w", mapNoSpace(err))
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		f.Close()
		_ = v.fs.Remove(tmp)
		return fmt.Errorf("stage snapshot metadata: %w", mapNoSpace(err))
	}
	if err := f.Sync(); err != nil {
		f.Close()
		_ = v.fs.Remove(tmp)
		return fmt.Errorf("stage snapshot metadata: sync: %w", mapNoSpace(err))
	}
	if err := f.Close(); err != nil {
		_ = v.fs.Remove(tmp)
		return fmt.Errorf("stage snapshot metadata: close: %w", err)
	}
	return nil
}

func (v *Volume) unstageSnapMeta() { _ = v.fs.Remove(filepath.Join(v.dir, snapMetaTmp)) }

// commitSnapMeta renames the staged metadata into place and makes the
// rename durable: after it returns the new list survives a power cut.
func (v *Volume) commitSnapMeta() error {
	if err := v.fs.Rename(filepath.Join(v.dir, snapMetaTmp), filepath.Join(v.dir, SnapshotMetaFile)); err != nil {
		return fmt.Errorf("commit snapshot metadata: %w", err)
	}
	if err := v.fs.SyncDir(v.dir); err != nil {
		return fmt.Errorf("commit snapshot metadata: sync directory: %w", err)
	}
	return nil
}

// writeSnapMeta stages and commits in one go (recovery, where no record
// is appended in between).
func (v *Volume) writeSnapMeta(list []*snapshot, nextID uint64, deleted []uint64) error {
	if err := v.stageSnapMeta(list, nextID, deleted); err != nil {
		return err
	}
	return v.commitSnapMeta()
}

// snapshot is one open snapshot.
//
// Its file: a 32-byte header, then entries appended in order, each a
// 24-byte header and, unless the entry says the block read as zeroes,
// one block of data:
//
//	file header: 0 magic "BLKDSNP1", 8 snapshot ID, 16 LSN, 24 block
//	             size (uint32), 28 CRC32C of bytes [0, 28)
//	entry:       0 CRC32C of bytes [4, 24) and the data, 4 magic
//	             snapEntMagic, 8 flags (bit 0: zero, no data), 12 0,
//	             16 block number
//
// Opening scans the entries into the in-memory index until the first
// that does not check out (a torn append) and cuts the file there.
type snapshot struct {
	info SnapshotInfo // immutable
	f    vfs.File

	appendMu sync.Mutex // serialises appends (flusher, merges)

	mu  sync.RWMutex
	idx map[uint64]int64 // block -> offset of its data in f (snapZeroEnt: zeroes)
	end int64            // where the next entry goes

	refs     int  // open SnapshotReaders; under snapSet.mu
	deleting bool // a delete is under way; under snapSet.mu
	// merged: a delete copied what the previous snapshot needs into it;
	// until the delete commits (or is undone) the flusher preserves
	// blocks in both. Changed under flushMu.
	merged atomic.Bool
	gone   atomic.Bool
}

const (
	snapHdrSize    = 32
	snapEntHdrSize = 24
	snapEntMagic   = 0x45504e53 // "SNPE"
	snapZeroEnt    = -1
	snapFlagZero   = 1
)

var snapFileMagic = [8]byte{'B', 'L', 'K', 'D', 'S', 'N', 'P', '1'}

func (s *snapshot) lookup(b uint64) (int64, bool) {
	s.mu.RLock()
	off, ok := s.idx[b]
	s.mu.RUnlock()
	return off, ok
}

func (s *snapshot) has(b uint64) bool { _, ok := s.lookup(b); return ok }

func (s *snapshot) heldBytes() int64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.end
}

func (s *snapshot) infoNow() SnapshotInfo {
	in := s.info
	in.HeldBytes = s.heldBytes()
	return in
}

// createSnapFile makes an empty snapshot file for info (replacing a
// leftover of an unfinished create) and makes it durable.
func (v *Volume) createSnapFile(info SnapshotInfo) (*snapshot, error) {
	name := filepath.Join(v.dir, SnapshotFile(info.ID))
	f, err := v.fs.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create snapshot file: %w", mapNoSpace(err))
	}
	var hdr [snapHdrSize]byte
	copy(hdr[:8], snapFileMagic[:])
	binary.LittleEndian.PutUint64(hdr[8:], info.ID)
	binary.LittleEndian.PutUint64(hdr[16:], info.LSN)
	binary.LittleEndian.PutUint32(hdr[24:], uint32(v.bs))
	binary.LittleEndian.PutUint32(hdr[28:], wal.Checksum(hdr[:28]))
	fail := func(step string, err error) (*snapshot, error) {
		f.Close()
		_ = v.fs.Remove(name)
		return nil, fmt.Errorf("create snapshot file: %s: %w", step, mapNoSpace(err))
	}
	if _, err := f.WriteAt(hdr[:], 0); err != nil {
		return fail("write header", err)
	}
	if err := f.Sync(); err != nil {
		return fail("sync", err)
	}
	if err := v.fs.SyncDir(v.dir); err != nil {
		return fail("sync directory", err)
	}
	return &snapshot{info: info, f: f, idx: map[uint64]int64{}, end: snapHdrSize}, nil
}

// removeSnapFile closes and removes s's file durably.
func (v *Volume) removeSnapFile(s *snapshot) error {
	if s.f != nil {
		s.f.Close()
	}
	err := v.fs.Remove(filepath.Join(v.dir, SnapshotFile(s.info.ID)))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove snapshot file: %w", err)
	}
	return v.fs.SyncDir(v.dir)
}

// openSnapFile opens info's file and rebuilds its index.
func (v *Volume) openSnapFile(info SnapshotInfo) (*snapshot, error) {
	name := filepath.Join(v.dir, SnapshotFile(info.ID))
	f, err := v.fs.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open snapshot %q file: %w", info.Name, err)
	}
	s := &snapshot{info: info, f: f, idx: map[uint64]int64{}}
	if err := v.scanSnapFile(s); err != nil {
		f.Close()
		return nil, fmt.Errorf("snapshot %q (%s): %w", info.Name, SnapshotFile(info.ID), err)
	}
	return s, nil
}

func (v *Volume) scanSnapFile(s *snapshot) error {
	st, err := s.f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	var hdr [snapHdrSize]byte
	if n, _ := s.f.ReadAt(hdr[:], 0); n < snapHdrSize {
		return fmt.Errorf("%w: snapshot file header short (%d bytes)", ErrCorrupt, n)
	}
	if string(hdr[:8]) != string(snapFileMagic[:]) || binary.LittleEndian.Uint32(hdr[28:]) != wal.Checksum(hdr[:28]) {
		return fmt.Errorf("%w: bad snapshot file header", ErrCorrupt)
	}
	if id, bs := binary.LittleEndian.Uint64(hdr[8:]), binary.LittleEndian.Uint32(hdr[24:]); id != s.info.ID || int64(bs) != v.bs {
		return fmt.Errorf("%w: snapshot file of snapshot %d with %d-byte blocks, want %d and %d", ErrCorrupt, id, bs, s.info.ID, v.bs)
	}
	bs := v.bs
	buf := make([]byte, 1<<20)
	var bufOff, bufLen int64 // file range held in buf
	get := func(off, n int64) []byte {
		if off >= bufOff && off+n <= bufOff+bufLen {
			return buf[off-bufOff : off-bufOff+n]
		}
		got, err := s.f.ReadAt(buf, off)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil
		}
		bufOff, bufLen = off, int64(got)
		if int64(got) < n {
			return nil
		}
		return buf[:n]
	}
	pos := int64(snapHdrSize)
	for pos+snapEntHdrSize <= size {
		h := get(pos, snapEntHdrSize)
		if h == nil || binary.LittleEndian.Uint32(h[4:]) != snapEntMagic {
			break
		}
		flags := binary.LittleEndian.Uint32(h[8:])
		block := binary.LittleEndian.Uint64(h[16:])
		n := int64(snapEntHdrSize)
		if flags&snapFlagZero == 0 {
			n += bs
		}
		e := get(pos, n)
		if e == nil || binary.LittleEndian.Uint32(e[0:]) != wal.Checksum(e[4:n]) {
			break
		}
		if flags&snapFlagZero != 0 {
			s.idx[block] = snapZeroEnt
		} else {
			s.idx[block] = pos + snapEntHdrSize
		}
		pos += n
	}
	s.end = pos
	if pos < size {
		// A torn append: cut it off so the next one starts clean.
		if err := s.f.Truncate(pos); err != nil {
			return fmt.Errorf("cut torn snapshot entry at %d: %w", pos, err)
		}
		if err := s.f.Sync(); err != nil {
			return fmt.Errorf("cut torn snapshot entry at %d: %w", pos, err)
		}
		v.log.Info("engine_snapshot_tail_cut", "snapshot", s.info.Name, "id", s.info.ID, "at", pos, "size", size)
	}
	return nil
}

// snapEnt is an entry to append: block b, and its data (nil: zeroes).
type snapEnt struct {
	block uint64
	data  []byte
}

// appendSnapEntries appends ents to s durably (write, fdatasync) and only
// then publishes them in the index: a block is in the index only once its
// pre-image is on disk, so the extent may be overwritten after this
// returns. A block already in the index is skipped. On error the file is
// cut back and nothing is published.
func (v *Volume) appendSnapEntries(s *snapshot, ents []snapEnt) error {
	if len(ents) == 0 {
		return nil
	}
	s.appendMu.Lock()
	defer s.appendMu.Unlock()
	s.mu.RLock()
	start := s.end
	s.mu.RUnlock()
	bs := v.bs
	type pub struct {
		block uint64
		off   int64
	}
	pubs := make([]pub, 0, len(ents))
	seen := make(map[uint64]bool, len(ents))
	buf := make([]byte, 0, min(int64(len(ents))*(bs+snapEntHdrSize), 1<<20+bs+snapEntHdrSize))
	pos := start
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		if _, err := s.f.WriteAt(buf, pos); err != nil {
			return err
		}
		pos += int64(len(buf))
		buf = buf[:0]
		return nil
	}
	for _, e := range ents {
		if seen[e.block] || s.has(e.block) {
			continue
		}
		seen[e.block] = true
		at := pos + int64(len(buf))
		var h [snapEntHdrSize]byte
		binary.LittleEndian.PutUint32(h[4:], snapEntMagic)
		binary.LittleEndian.PutUint64(h[16:], e.block)
		if e.data == nil || allZero(e.data) {
			binary.LittleEndian.PutUint32(h[8:], snapFlagZero)
			binary.LittleEndian.PutUint32(h[0:], wal.Checksum(h[4:]))
			buf = append(buf, h[:]...)
			pubs = append(pubs, pub{e.block, snapZeroEnt})
		} else {
			crc := wal.Checksum(h[4:])
			crc = checksumUpdate(crc, e.data)
			binary.LittleEndian.PutUint32(h[0:], crc)
			buf = append(buf, h[:]...)
			buf = append(buf, e.data...)
			pubs = append(pubs, pub{e.block, at + snapEntHdrSize})
		}
		if len(buf) >= 1<<20 {
			if err := flush(); err != nil {
				return v.cutSnapFile(s, start, err)
			}
		}
	}
	if err := flush(); err != nil {
		return v.cutSnapFile(s, start, err)
	}
	if len(pubs) == 0 {
		return nil
	}
	if err := s.f.Sync(); err != nil {
		return v.cutSnapFile(s, start, err)
	}
	s.mu.Lock()
	for _, p := range pubs {
		s.idx[p.block] = p.off
	}
	s.end = pos
	s.mu.Unlock()
	return nil
}

func (v *Volume) cutSnapFile(s *snapshot, at int64, err error) error {
	_ = s.f.Truncate(at)
	return fmt.Errorf("append to snapshot %q: %w", s.info.Name, mapNoSpace(err))
}

// readSnapBlock reads block data at off of s's file into p (one block);
// off is snapZeroEnt for a block that read as zeroes.
func (v *Volume) readSnapBlock(s *snapshot, off int64, p []byte) error {
	if off == snapZeroEnt {
		clear(p)
		return nil
	}
	if n, err := s.f.ReadAt(p, off); n < len(p) {
		return fmt.Errorf("read snapshot %q at %d: %w", s.info.Name, off, err)
	}
	return nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksumUpdate continues a wal.Checksum (CRC32C) over more bytes.
func checksumUpdate(crc uint32, b []byte) uint32 { return crc32.Update(crc, castagnoli, b) }

func allZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
