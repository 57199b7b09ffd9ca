// Package wal is the write-ahead log's record format: framing with a
// CRC32C (Castagnoli) checksum, record types, logical ring positions and a
// scanner that stops at the first record that does not check out. It does
// no file I/O policy of its own: records can be framed into any buffer and
// scanned from any io.ReaderAt.
//
// Record layout (little endian, HeaderSize bytes, then the payload, then
// zero padding up to an 8-byte boundary):
//
//	0  uint32 CRC32C over bytes [4, HeaderSize) and the payload
//	4  uint16 magic 0xB10C
//	6  uint8  type
//	7  uint8  format version (1)
//	8  uint32 length: Write: payload bytes; Zero: bytes zeroed;
//	          Padding: bytes skipped after the header; Barrier: 0;
//	          Snapshot, SnapshotDelete, Redirect: payload bytes (see
//	          snapshot.go, redirect.go)
//	12 uint32 gen: the volume's WAL generation (bumped at every open) that
//	          wrote the record; it never decreases along a valid log, so a
//	          stale record left behind by an earlier life is not mistaken
//	          for a new one that was never written
//	16 uint64 LSN (a Padding record carries the LSN of the record after it)
//	24 uint64 epoch
//	32 int64  offset (bytes)
package wal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// HeaderSize is the fixed size of a record header.
const HeaderSize = 40

// Align is the alignment of every record in the log.
const Align = 8

const (
	magic   = 0xB10C
	version = 1
)

// MaxPayload bounds the payload of one record (the Length field is 32 bits).
const MaxPayload = 1<<31 - 1

// RecordType is the kind of a record.
type RecordType uint8

const (
	// Write carries Length bytes of data for [Offset, Offset+Length).
	Write RecordType = 1
	// Zero makes [Offset, Offset+Length) read as zeroes (trim, write-zeroes).
	Zero RecordType = 2
	// Barrier marks a point in the log; it carries no data.
	Barrier RecordType = 3
	// Padding fills the end of the ring; scanners skip it.
	Padding RecordType = 4
	// Snapshot creates a snapshot at its LSN: the snapshot holds the
	// effect of every record before it. Its payload (CRC-covered) is a
	// SnapshotPayload; Offset is 0.
	Snapshot RecordType = 5
	// SnapshotDelete deletes the snapshot its payload names.
	SnapshotDelete RecordType = 6
	// Redirect is a large write whose data was written once, straight
	// to the volume's data files, instead of into the log: its payload
	// (a RedirectPayload) says where the data went and carries the
	// data's CRC, so that recovery can tell whole data from torn.
	// Offset is the byte offset of the data.
	Redirect RecordType = 7
)

func (t RecordType) String() string {
	switch t {
	case Write:
		return "write"
	case Zero:
		return "zero"
	case Barrier:
		return "barrier"
	case Padding:
		return "padding"
	case Snapshot:
		return "snapshot"
	case SnapshotDelete:
		return "snapshot-delete"
	case Redirect:
		return "redirect"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Record is one log record. Payload aliases the decoded buffer.
type Record struct {
	LSN     uint64
	Epoch   uint64
	Type    RecordType
	Offset  int64
	Length  uint32
	Gen     uint32
	Payload []byte
}

var (
	// ErrShort: the buffer ends inside the record.
	ErrShort = errors.New("wal: short record")
	// ErrCorrupt: the bytes are not a valid record (bad magic, CRC, fields).
	ErrCorrupt = errors.New("wal: corrupt record")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum is CRC32C, used for records and by the volume's superblock.
func Checksum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

func align(n int) int { return (n + Align - 1) &^ (Align - 1) }

// payloadLen is the number of bytes stored after the header.
func payloadLen(t RecordType, length uint32) int {
	switch t {
	case Write, Padding, Snapshot, SnapshotDelete, Redirect:
		return int(length)
	}
	return 0
}

// HasData reports whether records of type t carry Length payload bytes
// covered by the CRC (Write, the snapshot records and Redirect).
func HasData(t RecordType) bool {
	return t == Write || t == Snapshot || t == SnapshotDelete || t == Redirect
}

// EncodedSize is the number of log bytes a record of this type and length
// occupies, padding included.
func EncodedSize(t RecordType, length uint32) int {
	return align(HeaderSize + payloadLen(t, length))
}

// Size is EncodedSize for r.
func (r Record) Size() int { return EncodedSize(r.Type, r.Length) }

func validType(t RecordType) bool { return t >= Write && t <= Redirect }

// PutHeader writes r's header into hdr (at least HeaderSize bytes) with a
// CRC over the header and payload. For records with data (HasData)
// payload must be exactly r.Length bytes; it is not copied (use it to write the header and
// the payload with separate calls).
func PutHeader(hdr []byte, r Record, payload []byte) {
	_ = hdr[HeaderSize-1]
	binary.LittleEndian.PutUint16(hdr[4:], magic)
	hdr[6] = byte(r.Type)
	hdr[7] = version
	binary.LittleEndian.PutUint32(hdr[8:], r.Length)
	binary.LittleEndian.PutUint32(hdr[12:], r.Gen)
	binary.LittleEndian.PutUint64(hdr[16:], r.LSN)
	binary.LittleEndian.PutUint64(hdr[24:], r.Epoch)
	binary.LittleEndian.PutUint64(hdr[32:], uint64(r.Offset))
	crc := crc32.Update(0, castagnoli, hdr[4:HeaderSize])
	if HasData(r.Type) {
		crc = crc32.Update(crc, castagnoli, payload)
	}
	binary.LittleEndian.PutUint32(hdr[0:], crc)
}

// EncodeInto frames r into buf, which must hold r.Size() bytes, and
// returns the number of bytes used. The payload of a record with data
// (HasData) is r.Payload (len must equal r.Length); a Padding record's
// skipped bytes are zeroed.
func EncodeInto(buf []byte, r Record) int {
	n := r.Size()
	buf = buf[:n]
	pl := payloadLen(r.Type, r.Length)
	if HasData(r.Type) {
		copy(buf[HeaderSize:], r.Payload[:r.Length])
	} else {
		clear(buf[HeaderSize : HeaderSize+pl])
	}
	clear(buf[HeaderSize+pl:])
	PutHeader(buf, r, r.Payload)
	return n
}

// Encode appends the framed record to dst.
func Encode(dst []byte, r Record) []byte {
	if HasData(r.Type) && len(r.Payload) != int(r.Length) {
		r.Length = uint32(len(r.Payload))
	}
	n := r.Size()
	start := len(dst)
	dst = append(dst, make([]byte, n)...)
	EncodeInto(dst[start:], r)
	return dst
}

// DecodeHeader parses and sanity-checks a header without verifying the
// CRC. It returns the record (no payload) and its encoded size.
func DecodeHeader(hdr []byte) (Record, int, error) {
	if len(hdr) < HeaderSize {
		return Record{}, 0, ErrShort
	}
	if binary.LittleEndian.Uint16(hdr[4:]) != magic || hdr[7] != version {
		return Record{}, 0, fmt.Errorf("%w: bad magic or version", ErrCorrupt)
	}
	r := Record{
		Type:   RecordType(hdr[6]),
		Length: binary.LittleEndian.Uint32(hdr[8:]),
		Gen:    binary.LittleEndian.Uint32(hdr[12:]),
		LSN:    binary.LittleEndian.Uint64(hdr[16:]),
		Epoch:  binary.LittleEndian.Uint64(hdr[24:]),
		Offset: int64(binary.LittleEndian.Uint64(hdr[32:])),
	}
	if !validType(r.Type) {
		return Record{}, 0, fmt.Errorf("%w: unknown type %d", ErrCorrupt, hdr[6])
	}
	if r.Length > MaxPayload {
		return Record{}, 0, fmt.Errorf("%w: length %d too large", ErrCorrupt, r.Length)
	}
	if r.Type == Barrier && r.Length != 0 {
		return Record{}, 0, fmt.Errorf("%w: barrier with length", ErrCorrupt)
	}
	if (r.Type == Snapshot || r.Type == SnapshotDelete) && (r.Length > MaxSnapshotPayload || r.Offset != 0) {
		return Record{}, 0, fmt.Errorf("%w: %s record with length %d offset %d", ErrCorrupt, r.Type, r.Length, r.Offset)
	}
	if r.Type == Redirect && (r.Length < redirectFixed || r.Length > MaxRedirectPayload) {
		return Record{}, 0, fmt.Errorf("%w: redirect record with length %d", ErrCorrupt, r.Length)
	}
	if r.Type != Padding && r.Offset < 0 {
		return Record{}, 0, fmt.Errorf("%w: negative offset", ErrCorrupt)
	}
	return r, r.Size(), nil
}

// Decode parses one record at the start of buf and verifies its CRC. It
// returns the record (Payload aliasing buf) and its encoded size. ErrShort
// means buf ends inside the record; ErrCorrupt that it is not a record.
func Decode(buf []byte) (Record, int, error) {
	r, n, err := DecodeHeader(buf)
	if err != nil {
		return Record{}, 0, err
	}
	pl := payloadLen(r.Type, r.Length)
	if len(buf) < HeaderSize+pl {
		return Record{}, 0, ErrShort
	}
	crc := crc32.Update(0, castagnoli, buf[4:HeaderSize])
	if HasData(r.Type) {
		crc = crc32.Update(crc, castagnoli, buf[HeaderSize:HeaderSize+pl])
		r.Payload = buf[HeaderSize : HeaderSize+pl : HeaderSize+pl]
	}
	if crc != binary.LittleEndian.Uint32(buf[0:]) {
		return Record{}, 0, fmt.Errorf("%w: CRC mismatch", ErrCorrupt)
	}
	return r, n, nil
}
