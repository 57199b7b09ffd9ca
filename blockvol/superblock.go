package blockvol

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/blockd/blockd/wal"
)

// The superblock file holds two 4 KiB slots. Every update writes the slot
// the last one did not (seq alternates) and fdatasyncs, so a torn update
// leaves the other slot intact; Open takes the valid slot with the higher
// sequence number and refuses the volume when neither validates.
const (
	sbSlotSize  = 4096
	sbFileSize  = 2 * sbSlotSize
	sbEncodeLen = 256
	sbVersion   = 1
	maxRoleLen  = 32
)

var sbMagic = [8]byte{'B', 'L', 'K', 'D', 'V', 'O', 'L', '1'}

// superblock is the persistent state of a volume besides its data.
type superblock struct {
	Seq       uint64
	Size      int64
	BlockSize uint32
	WALSize   int64
	// Gen is the WAL generation: bumped and persisted at every open before
	// the first append, and stamped into every record, so that recovery
	// can tell a record of this life from a stale one of an earlier life.
	Gen   uint32
	Epoch uint64
	Role  string
	// CheckpointLSN: every record <= it is in the extent, which is synced.
	// CheckpointPos is where the record CheckpointLSN+1 starts.
	CheckpointLSN uint64
	CheckpointPos uint64
	// TailLSN/TailPos: the oldest record still in the WAL (retained for
	// replication; TailLSN <= CheckpointLSN+1). Recovery scans from here.
	TailLSN uint64
	TailPos uint64
	// DurableLSN: the WAL was fdatasynced up to it when the superblock was
	// written; recovery that ends below it means lost durable data.
	DurableLSN  uint64
	CreatedUnix int64
	// GenLSN is the first LSN generation Gen writes, persisted with the
	// bump: every record from it on must carry Gen. Without it a stale
	// record an earlier life left where the tail now is, with an LSN this
	// life reused, would be replayed (0: unknown, a superblock written
	// before the field existed).
	GenLSN uint64
	// PendingSize/PendingExpandID: a prepared, uncommitted expand
	// (expand.go); 0 = none.
	PendingSize     int64
	PendingExpandID uint64
}

func (s *superblock) encode(buf []byte) {
	clear(buf[:sbSlotSize])
	copy(buf[0:8], sbMagic[:])
	le := binary.LittleEndian
	le.PutUint32(buf[8:], sbVersion)
	le.PutUint64(buf[16:], s.Seq)
	le.PutUint64(buf[24:], uint64(s.Size))
	le.PutUint32(buf[32:], s.BlockSize)
	le.PutUint32(buf[36:], s.Gen)
	le.PutUint64(buf[40:], uint64(s.WALSize))
	le.PutUint64(buf[48:], s.Epoch)
	le.PutUint64(buf[56:], s.CheckpointLSN)
	le.PutUint64(buf[64:], s.CheckpointPos)
	le.PutUint64(buf[72:], s.TailLSN)
	le.PutUint64(buf[80:], s.TailPos)
	le.PutUint64(buf[88:], s.DurableLSN)
	le.PutUint64(buf[96:], uint64(s.CreatedUnix))
	le.PutUint64(buf[144:], s.GenLSN)
	buf[104] = byte(len(s.Role))
	copy(buf[105:105+maxRoleLen], s.Role)
	s.encodeExpand(buf)
	le.PutUint32(buf[sbEncodeLen-4:], wal.Checksum(buf[:sbEncodeLen-4]))
}

var errBadSlot = errors.New("invalid superblock slot")

func decodeSuperblock(buf []byte) (superblock, error) {
	var s superblock
	if len(buf) < sbEncodeLen {
		return s, fmt.Errorf("%w: short", errBadSlot)
	}
	if !bytes.Equal(buf[0:8], sbMagic[:]) {
		return s, fmt.Errorf("%w: bad magic", errBadSlot)
	}
	le := binary.LittleEndian
	if got, want := le.Uint32(buf[sbEncodeLen-4:]), wal.Checksum(buf[:sbEncodeLen-4]); got != want {
		return s, fmt.Errorf("%w: checksum %08x, want %08x", errBadSlot, got, want)
	}
	if v := le.Uint32(buf[8:]); v != sbVersion {
		return s, fmt.Errorf("%w: version %d not supported", errBadSlot, v)
	}
	s.Seq = le.Uint64(buf[16:])
	s.Size = int64(le.Uint64(buf[24:]))
	s.BlockSize = le.Uint32(buf[32:])
	s.Gen = le.Uint32(buf[36:])
	s.WALSize = int64(le.Uint64(buf[40:]))
	s.Epoch = le.Uint64(buf[48:])
	s.CheckpointLSN = le.Uint64(buf[56:])
	s.CheckpointPos = le.Uint64(buf[64:])
	s.TailLSN = le.Uint64(buf[72:])
	s.TailPos = le.Uint64(buf[80:])
	s.DurableLSN = le.Uint64(buf[88:])
	s.CreatedUnix = int64(le.Uint64(buf[96:]))
	s.GenLSN = le.Uint64(buf[144:]) // after the role's 32 bytes; 0 in older superblocks
	rl := int(buf[104])
	if rl > maxRoleLen {
		return s, fmt.Errorf("%w: role length %d", errBadSlot, rl)
	}
	s.Role = string(buf[105 : 105+rl])
	s.decodeExpand(buf)
	if err := s.validate(); err != nil {
		return s, fmt.Errorf("%w: %v", errBadSlot, err)
	}
	return s, nil
}

func (s *superblock) validate() error {
	switch {
	case s.BlockSize < 512 || s.BlockSize > 65536 || s.BlockSize&(s.BlockSize-1) != 0:
		return fmt.Errorf("block size %d", s.BlockSize)
	case s.Size <= 0 || s.Size%int64(s.BlockSize) != 0:
		return fmt.Errorf("size %d not a positive multiple of block size %d", s.Size, s.BlockSize)
	case s.WALSize < MinWALSize || s.WALSize%4096 != 0:
		return fmt.Errorf("WAL size %d", s.WALSize)
	case s.Gen == 0:
		return fmt.Errorf("WAL generation 0")
	case s.TailLSN == 0 || s.TailLSN > s.CheckpointLSN+1:
		return fmt.Errorf("tail LSN %d beyond checkpoint LSN %d", s.TailLSN, s.CheckpointLSN)
	case s.TailPos > s.CheckpointPos || s.CheckpointPos-s.TailPos > uint64(s.WALSize):
		return fmt.Errorf("tail position %d, checkpoint position %d", s.TailPos, s.CheckpointPos)
	case s.CheckpointPos%wal.Align != 0 || s.TailPos%wal.Align != 0:
		return fmt.Errorf("unaligned WAL position")
	}
	if err := s.validateExpand(); err != nil {
		return err
	}
	return nil
}

// readSuperblock picks the valid slot with the highest sequence number.
func readSuperblock(buf []byte) (superblock, error) {
	a, errA := decodeSuperblock(buf[:sbSlotSize])
	b, errB := decodeSuperblock(buf[sbSlotSize:])
	switch {
	case errA == nil && errB == nil:
		if b.Seq > a.Seq {
			return b, nil
		}
		return a, nil
	case errA == nil:
		return a, nil
	case errB == nil:
		return b, nil
	}
	return superblock{}, fmt.Errorf("%w: slot 0: %v; slot 1: %v", ErrCorrupt, errA, errB)
}
