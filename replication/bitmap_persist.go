package replication

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

// Dirty-region bitmaps are persisted per replica in StateDir at
// checkpoints: union of both generations, the LSN it covers from, and the
// last LSN marked into it (through). While persistence is on, the primary's
// retention hold keeps every record after `through` in the WAL, so after
// a restart the bitmap is completed from the WAL and still covers every
// record since `from`.

const bitmapMagic = 0x42444d31 // "BDM1"

func bitmapPath(dir, id string) string {
	safe := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' {
			return r
		}
		return '_'
	}, id)
	return filepath.Join(dir, "repl-bitmap-"+safe+".bin")
}

type bitmapSnap struct {
	regionSize int64
	n          int
	from       uint64
	through    uint64
	bits       []uint64
}

func (b *dirtyBitmap) snapshot(through uint64) bitmapSnap {
	s := bitmapSnap{regionSize: b.regionSize, n: b.n, from: b.from(), through: through, bits: make([]uint64, len(b.cur.bits))}
	for i := range s.bits {
		s.bits[i] = b.cur.bits[i]
		if b.prev != nil {
			s.bits[i] |= b.prev.bits[i]
		}
	}
	return s
}

func (s bitmapSnap) encode() []byte {
	out := make([]byte, 0, 40+8*len(s.bits))
	out = binary.BigEndian.AppendUint32(out, bitmapMagic)
	out = binary.BigEndian.AppendUint64(out, uint64(s.regionSize))
	out = binary.BigEndian.AppendUint64(out, uint64(s.n))
	out = binary.BigEndian.AppendUint64(out, s.from)
	out = binary.BigEndian.AppendUint64(out, s.through)
	for _, w := range s.bits {
		out = binary.BigEndian.AppendUint64(out, w)
	}
	return binary.BigEndian.AppendUint32(out, crc32.Checksum(out, castagnoli))
}

func decodeBitmapSnap(b []byte) (bitmapSnap, error) {
	var s bitmapSnap
	if len(b) < 40 || binary.BigEndian.Uint32(b) != bitmapMagic {
		return s, errors.New("bad bitmap header")
	}
	body, crc := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if crc32.Checksum(body, castagnoli) != crc {
		return s, errors.New("bitmap CRC mismatch")
	}
	s.regionSize = int64(binary.BigEndian.Uint64(b[4:]))
	s.n = int(binary.BigEndian.Uint64(b[12:]))
	s.from = binary.BigEndian.Uint64(b[20:])
	s.through = binary.BigEndian.Uint64(b[28:])
	words := (len(body) - 36) / 8
	if s.n <= 0 || (s.n+63)/64 != words || (len(body)-36)%8 != 0 {
		return s, errors.New("bitmap size mismatch")
	}
	s.bits = make([]uint64, words)
	for i := range s.bits {
		s.bits[i] = binary.BigEndian.Uint64(body[36+8*i:])
	}
	return s, nil
}

func (p *Primary) writeBitmap(id string, s bitmapSnap) error {
	path := bitmapPath(p.cfg.StateDir, id)
	if err := vfs.WriteFileAtomic(p.cfg.FS, path, s.encode(), 0o644); err != nil {
		return fmt.Errorf("replication: bitmap %s: %w", path, err)
	}
	return nil
}

func (p *Primary) readBitmap(id string) (bitmapSnap, error) {
	path := bitmapPath(p.cfg.StateDir, id)
	f, err := p.cfg.FS.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return bitmapSnap{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return bitmapSnap{}, err
	}
	if fi.Size() > 64<<20 {
		return bitmapSnap{}, errors.New("bitmap file too large")
	}
	buf := make([]byte, fi.Size())
	if _, err := f.ReadAt(buf, 0); err != nil && err != io.EOF {
		return bitmapSnap{}, err
	}
	return decodeBitmapSnap(buf)
}

// persistBitmaps writes every replica's bitmap when the checkpoint moved
// since the last time, then lets the bitmap's retention hold move past
// what they cover.
func (p *Primary) persistBitmaps() {
	if p.cfg.StateDir == "" {
		return
	}
	ck := p.vol.CheckpointLSN()
	if ck == p.bmCkpt.Load() && p.bmThrough.Load() != 0 {
		return
	}
	p.mu.Lock()
	ids := make([]*replica, 0, len(p.reps))
	for _, r := range p.reps {
		ids = append(ids, r)
	}
	p.mu.Unlock()
	p.smu.Lock()
	through := p.lastLSN
	snaps := make([]bitmapSnap, len(ids))
	for i, r := range ids {
		snaps[i] = r.bm.snapshot(through)
	}
	p.smu.Unlock()
	for i, r := range ids {
		if err := p.writeBitmap(r.id, snaps[i]); err != nil {
			p.log.Warn("bitmap_persist_failed", "replica", r.id, "err", err.Error())
			return
		}
	}
	p.bmThrough.Store(through)
	p.bmCkpt.Store(ck)
}

// loadBitmap restores a replica's persisted bitmap into bm.prev and
// completes it from the WAL; it is called before the replica's first
// session. A bitmap that cannot be completed is dropped.
func (p *Primary) loadBitmap(r *replica) {
	if p.cfg.StateDir == "" {
		return
	}
	s, err := p.readBitmap(r.id)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			p.log.Warn("bitmap_load_failed", "replica", r.id, "err", err.Error())
		}
		return
	}
	p.smu.Lock()
	bm := r.bm
	if s.regionSize != bm.regionSize || s.n != bm.n {
		p.smu.Unlock()
		p.log.Warn("bitmap_load_failed", "replica", r.id, "err", "geometry changed")
		return
	}
	curStart := bm.cur.start
	p.smu.Unlock()
	g := &bitGen{start: s.from, bits: s.bits}
	tmp := &dirtyBitmap{regionSize: s.regionSize, n: s.n, cur: g}
	if s.through+1 < curStart {
		err := p.vol.ReadRecords(s.through+1, func(rec wal.Record) error {
			if rec.LSN >= curStart {
				return errStopScan
			}
			if rec.Type == wal.Write || rec.Type == wal.Zero {
				tmp.mark(rec.Offset, int64(rec.Length))
			}
			return nil
		})
		if err != nil && !errors.Is(err, errStopScan) {
			p.log.Warn("bitmap_load_failed", "replica", r.id, "err", err.Error(), "through", s.through)
			return
		}
	}
	p.smu.Lock()
	bm.prev = g
	p.smu.Unlock()
	p.log.Info("bitmap_loaded", "replica", r.id, "from", s.from, "through", s.through, "regions", len(tmp.regions()))
}

var errStopScan = errors.New("stop scan")
