package wal

import (
	"bytes"
	"errors"
	"testing"
)

// A snapshot record round-trips, its payload is covered by the CRC, and
// the scanner returns it with its payload.
func TestSnapshotRecord(t *testing.T) {
	p := SnapshotPayload{ID: 9, CreatedNano: 123, Size: 1 << 20, Name: "nightly", UUID: "0f0e0d0c-0b0a-4908-8706-050403020100"}
	pl, err := p.Encode()
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []RecordType{Snapshot, SnapshotDelete} {
		b := Encode(nil, Record{LSN: 1, Gen: 1, Type: typ, Payload: pl})
		r, n, err := Decode(b)
		if err != nil || n != len(b) || r.Type != typ || int(r.Length) != len(pl) {
			t.Fatalf("%s: decode %+v %d %v", typ, r, n, err)
		}
		got, err := DecodeSnapshotPayload(r.Payload)
		if err != nil || got != p {
			t.Fatalf("%s: payload %+v %v", typ, got, err)
		}
		b[HeaderSize+30] ^= 1 // inside the name
		if _, _, err := Decode(b); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("%s: flipped payload byte: %v", typ, err)
		}
	}
	ring := make([]byte, 4096)
	writeRing(ring, 0, []Record{
		{LSN: 1, Gen: 1, Type: Write, Length: 512, Payload: make([]byte, 512)},
		{LSN: 2, Gen: 1, Type: Snapshot, Length: uint32(len(pl)), Payload: pl},
		{LSN: 3, Gen: 1, Type: Barrier},
	})
	var seen []RecordType
	res, err := Scan(bytes.NewReader(ring), Ring{Size: 4096}, ScanOptions{FirstLSN: 1}, func(_ uint64, r Record) error {
		seen = append(seen, r.Type)
		if r.Type == Snapshot && !bytes.Equal(r.Payload, pl) {
			t.Fatal("scanned snapshot payload differs")
		}
		return nil
	})
	if err != nil || res.LastLSN != 3 || len(seen) != 3 || seen[1] != Snapshot {
		t.Fatalf("scan %+v %v %v", res, err, seen)
	}
	// Oversized and offset-carrying snapshot headers are refused.
	for _, r := range []Record{
		{LSN: 1, Type: Snapshot, Length: MaxSnapshotPayload + 1},
		{LSN: 1, Type: SnapshotDelete, Length: 8, Offset: 4096},
	} {
		var hdr [HeaderSize]byte
		PutHeader(hdr[:], r, make([]byte, r.Length))
		if _, _, err := DecodeHeader(hdr[:]); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("header %+v: %v", r, err)
		}
	}
	if _, err := (SnapshotPayload{Name: string(make([]byte, 256))}).Encode(); err == nil {
		t.Fatal("256-byte name encoded")
	}
}
