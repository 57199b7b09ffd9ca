package wal

import (
	"encoding/binary"
	"fmt"
)

// SnapshotPayload is the payload of a Snapshot or SnapshotDelete record
// (covered by the record's CRC like a Write's data). Layout, little
// endian:
//
//	0  uint8  payload version (1)
//	1  uint8  name length
//	2  uint8  UUID length
//	3  uint8  reserved (0)
//	4  uint64 snapshot ID
//	12 int64  created, Unix nanoseconds
//	20 int64  volume size in bytes when the snapshot was taken
//	28 name, then UUID
//
// A SnapshotDelete carries the same fields as the Snapshot it deletes
// (ID and name identify it; the rest is informational).
type SnapshotPayload struct {
	ID          uint64
	CreatedNano int64
	Size        int64
	Name        string
	UUID        string
}

const (
	snapPayloadVersion = 1
	snapPayloadFixed   = 28
	// MaxSnapshotPayload bounds the payload of a snapshot record.
	MaxSnapshotPayload = snapPayloadFixed + 255 + 255
)

// Encode returns the payload bytes. Name and UUID must be at most 255
// bytes each.
func (p SnapshotPayload) Encode() ([]byte, error) {
	if len(p.Name) > 255 || len(p.UUID) > 255 {
		return nil, fmt.Errorf("wal: snapshot payload: name %d or UUID %d bytes, at most 255", len(p.Name), len(p.UUID))
	}
	b := make([]byte, snapPayloadFixed, snapPayloadFixed+len(p.Name)+len(p.UUID))
	b[0] = snapPayloadVersion
	b[1] = byte(len(p.Name))
	b[2] = byte(len(p.UUID))
	binary.LittleEndian.PutUint64(b[4:], p.ID)
	binary.LittleEndian.PutUint64(b[12:], uint64(p.CreatedNano))
	binary.LittleEndian.PutUint64(b[20:], uint64(p.Size))
	b = append(b, p.Name...)
	b = append(b, p.UUID...)
	return b, nil
}

// DecodeSnapshotPayload parses a snapshot record's payload. The error
// wraps ErrCorrupt and names what is wrong.
func DecodeSnapshotPayload(b []byte) (SnapshotPayload, error) {
	var p SnapshotPayload
	if len(b) < snapPayloadFixed {
		return p, fmt.Errorf("%w: snapshot payload of %d bytes, at least %d", ErrCorrupt, len(b), snapPayloadFixed)
	}
	if b[0] != snapPayloadVersion || b[3] != 0 {
		return p, fmt.Errorf("%w: snapshot payload version %d", ErrCorrupt, b[0])
	}
	nl, ul := int(b[1]), int(b[2])
	if len(b) != snapPayloadFixed+nl+ul {
		return p, fmt.Errorf("%w: snapshot payload of %d bytes, name %d and UUID %d bytes say %d", ErrCorrupt, len(b), nl, ul, snapPayloadFixed+nl+ul)
	}
	p.ID = binary.LittleEndian.Uint64(b[4:])
	p.CreatedNano = int64(binary.LittleEndian.Uint64(b[12:]))
	p.Size = int64(binary.LittleEndian.Uint64(b[20:]))
	p.Name = string(b[snapPayloadFixed : snapPayloadFixed+nl])
	p.UUID = string(b[snapPayloadFixed+nl:])
	return p, nil
}
