// Package image is blockd's self-describing sparse volume image: the byte
// stream `blockd volume export` writes and `blockd volume import` reads.
// docs/IMAGE-FORMAT.md describes every byte; this package is the one
// implementation. It knows nothing of volumes: a Writer turns ranges of
// data and zeroes into a stream, a Reader turns a stream back into
// records and refuses anything truncated, corrupted, reordered or of an
// unknown version.
package image

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/bits"
	"time"
)

// Magic opens every image. The high first byte and the CR LF pair make a
// text-mode transfer or a truncation to 7 bits visible at once.
var Magic = [8]byte{0x89, 'B', 'D', 'I', 'M', 'G', '\r', '\n'}

// EndMagic closes every image, after the trailer.
var EndMagic = [8]byte{'B', 'D', 'I', 'M', 'G', 'E', 'N', 'D'}

// Version is the format version this package writes and the only one it
// reads.
const Version = 1

// Kind says what an image holds.
type Kind uint8

const (
	// Full: the whole volume; every range without a data record reads
	// as zeroes.
	Full Kind = 1
	// Diff: only what changed since a base snapshot; data records and
	// zero records replace ranges, everything else keeps the base's bytes.
	Diff Kind = 2
)

func (k Kind) String() string {
	switch k {
	case Full:
		return "full"
	case Diff:
		return "diff"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Record types.
const (
	recData    = 'D'
	recZero    = 'Z'
	recTrailer = 'T'
)

// Sizes of the fixed parts (bytes).
const (
	headerFixed  = 40 // magic .. created
	recordHeader = 32 // type, reserved, seq, offset, length
	crcSize      = 4
	trailerBody  = 48 + 32 // type .. zero bytes, then the digest
	trailerSize  = trailerBody + crcSize + len(EndMagic)
)

// Limits a Reader enforces before it allocates or trusts anything.
const (
	MinBlockSize     = 512
	MaxBlockSize     = 1 << 20
	MaxChunkSize     = 16 << 20
	DefaultChunkSize = 1 << 20
	maxHeader        = headerFixed + 5*(1+255) + crcSize
	// MaxVolumeSize keeps every offset+length sum far from overflow.
	MaxVolumeSize = 1 << 60
)

// Errors. Every error a Reader returns wraps exactly one of them, with the
// byte offset and the field that failed.
var (
	// ErrTruncated: the stream ended before the end marker.
	ErrTruncated = errors.New("image truncated")
	// ErrCorrupt: a checksum, a field or the order of records is wrong.
	ErrCorrupt = errors.New("image corrupt")
	// ErrVersion: a well-formed image of a version this build cannot read.
	ErrVersion = errors.New("unsupported image version")
	// ErrNotImage: the stream does not start with the image magic.
	ErrNotImage = errors.New("not a blockd image")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(p []byte) uint32 { return crc32.Checksum(p, castagnoli) }

// Header describes an image: the volume geometry, what the image holds,
// and which snapshots it was made from.
type Header struct {
	Kind      Kind
	BlockSize int   // bytes; every offset and length is a multiple
	ChunkSize int   // bytes; no data record crosses a chunk boundary
	Size      int64 // the volume's size in bytes at the source snapshot
	Created   time.Time
	// Volume is the name of the volume the image was exported from
	// (informational).
	Volume string
	// Source names the snapshot whose content the image carries, with its
	// UUID. Both are empty for an export of a live volume (its temporary
	// snapshot is gone once the export ends).
	SourceName, SourceUUID string
	// Base is the snapshot a Diff applies on top of; empty for Full.
	BaseName, BaseUUID string
}

// Validate reports the first thing wrong with h, for a writer before it
// starts and for a reader after it decoded a header.
func (h *Header) Validate() error {
	switch h.Kind {
	case Full, Diff:
	default:
		return fmt.Errorf("kind %d is neither full (1) nor diff (2)", h.Kind)
	}
	if h.BlockSize < MinBlockSize || h.BlockSize > MaxBlockSize || bits.OnesCount(uint(h.BlockSize)) != 1 {
		return fmt.Errorf("block size %d is not a power of two in [%d, %d]", h.BlockSize, MinBlockSize, MaxBlockSize)
	}
	if h.ChunkSize < h.BlockSize || h.ChunkSize > MaxChunkSize || bits.OnesCount(uint(h.ChunkSize)) != 1 {
		return fmt.Errorf("chunk size %d is not a power of two in [block size %d, %d]", h.ChunkSize, h.BlockSize, MaxChunkSize)
	}
	if h.Size <= 0 || h.Size > MaxVolumeSize || h.Size%int64(h.BlockSize) != 0 {
		return fmt.Errorf("volume size %d is not a positive multiple of the block size %d (at most %d)", h.Size, h.BlockSize, int64(MaxVolumeSize))
	}
	for _, s := range []struct{ what, v string }{
		{"volume name", h.Volume}, {"source snapshot name", h.SourceName}, {"source snapshot uuid", h.SourceUUID},
		{"base snapshot name", h.BaseName}, {"base snapshot uuid", h.BaseUUID},
	} {
		if len(s.v) > 255 {
			return fmt.Errorf("%s is %d bytes, at most 255", s.what, len(s.v))
		}
	}
	if (h.SourceName == "") != (h.SourceUUID == "") {
		return fmt.Errorf("source snapshot needs both a name and a uuid (name %q, uuid %q)", h.SourceName, h.SourceUUID)
	}
	switch h.Kind {
	case Full:
		if h.BaseName != "" || h.BaseUUID != "" {
			return fmt.Errorf("a full image has no base snapshot (got %q %q)", h.BaseName, h.BaseUUID)
		}
	case Diff:
		if h.BaseName == "" || h.BaseUUID == "" {
			return fmt.Errorf("a diff image needs a base snapshot name and uuid (name %q, uuid %q)", h.BaseName, h.BaseUUID)
		}
	}
	return nil
}

// marshal encodes a valid header.
func (h *Header) marshal() []byte {
	strs := []string{h.Volume, h.SourceName, h.SourceUUID, h.BaseName, h.BaseUUID}
	n := headerFixed + crcSize
	for _, s := range strs {
		n += 1 + len(s)
	}
	b := make([]byte, headerFixed, n)
	copy(b[0:8], Magic[:])
	binary.LittleEndian.PutUint16(b[8:], Version)
	binary.LittleEndian.PutUint16(b[10:], uint16(n))
	b[12] = byte(h.Kind)
	// b[13] flags, b[14:16] reserved: zero
	binary.LittleEndian.PutUint32(b[16:], uint32(h.BlockSize))
	binary.LittleEndian.PutUint32(b[20:], uint32(h.ChunkSize))
	binary.LittleEndian.PutUint64(b[24:], uint64(h.Size))
	binary.LittleEndian.PutUint64(b[32:], uint64(h.Created.UnixNano()))
	for _, s := range strs {
		b = append(b, byte(len(s)))
		b = append(b, s...)
	}
	return binary.LittleEndian.AppendUint32(b, crc(b))
}

// Summary is what the trailer records: the counts a reader checks and the
// digest of the whole image.
type Summary struct {
	DataRecords uint64
	ZeroRecords uint64
	DataBytes   uint64 // payload bytes of all data records
	ZeroBytes   uint64 // bytes covered by zero records
	// Digest is SHA-256 over the header and, for every record, its
	// 32-byte header and its CRC (the CRC covers the payload).
	Digest [32]byte
}

// Record is one decoded data or zero record.
type Record struct {
	Zero bool  // a zero record: [Off, Off+Len) reads as zeroes
	Off  int64 // byte offset in the volume
	Len  int64
	// Data is the payload of a data record (len == Len). It is valid only
	// until the next call to Reader.Next.
	Data []byte
}

func putRecordHeader(b []byte, typ byte, seq uint64, off, length int64) {
	b[0] = typ
	b[1], b[2], b[3] = 0, 0, 0
	binary.LittleEndian.PutUint32(b[4:], 0)
	binary.LittleEndian.PutUint64(b[8:], seq)
	binary.LittleEndian.PutUint64(b[16:], uint64(off))
	binary.LittleEndian.PutUint64(b[24:], uint64(length))
}

func putTrailer(b []byte, seq uint64, s *Summary) {
	b[0] = recTrailer
	b[1], b[2], b[3] = 0, 0, 0
	binary.LittleEndian.PutUint32(b[4:], 0)
	binary.LittleEndian.PutUint64(b[8:], seq)
	binary.LittleEndian.PutUint64(b[16:], s.DataRecords)
	binary.LittleEndian.PutUint64(b[24:], s.ZeroRecords)
	binary.LittleEndian.PutUint64(b[32:], s.DataBytes)
	binary.LittleEndian.PutUint64(b[40:], s.ZeroBytes)
	copy(b[48:80], s.Digest[:])
	binary.LittleEndian.PutUint32(b[80:], crc(b[:80]))
	copy(b[84:92], EndMagic[:])
}
