package wal

import (
	"bytes"
	"encoding/binary"
	"testing"
)

func seedRecords() [][]byte {
	return [][]byte{
		Encode(nil, Record{LSN: 1, Epoch: 1, Type: Write, Offset: 4096, Length: 16, Gen: 1, Payload: bytes.Repeat([]byte{0xab}, 16)}),
		Encode(nil, Record{LSN: 2, Type: Zero, Offset: 0, Length: 1 << 20, Gen: 1}),
		Encode(nil, Record{LSN: 3, Type: Barrier, Gen: 2}),
		Encode(nil, Record{LSN: 4, Type: Padding, Length: 24, Gen: 2}),
		Encode(nil, Record{LSN: 5, Type: Snapshot, Gen: 2, Payload: seedSnapPayload()}),
		Encode(nil, Record{LSN: 6, Type: SnapshotDelete, Gen: 2, Payload: seedSnapPayload()}),
		make([]byte, HeaderSize),
		{},
	}
}

// FuzzDecode: random bytes never panic, and whatever decodes has a CRC
// that matches its bytes and a consistent size.
func FuzzDecode(f *testing.F) {
	for _, s := range seedRecords() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, n, err := Decode(b)
		if err != nil {
			return
		}
		if n != r.Size() || n < HeaderSize || n%Align != 0 {
			t.Fatalf("decoded size %d for %+v", n, r)
		}
		pl := 0
		if HasData(r.Type) {
			pl = int(r.Length)
			if len(r.Payload) != pl {
				t.Fatalf("payload %d bytes, length %d", len(r.Payload), r.Length)
			}
		}
		if len(b) < HeaderSize+pl {
			t.Fatalf("decoded past the buffer")
		}
		crc := Checksum(append(append([]byte(nil), b[4:HeaderSize]...), b[HeaderSize:HeaderSize+pl]...))
		if crc != binary.LittleEndian.Uint32(b) {
			t.Fatalf("decoded with a CRC that does not match")
		}
		// Re-encoding gives the same bytes.
		re := make([]byte, n)
		EncodeInto(re, r)
		if !bytes.Equal(re[:HeaderSize+pl], b[:HeaderSize+pl]) {
			t.Fatalf("re-encoding differs")
		}
	})
}

func seedSnapPayload() []byte {
	b, _ := SnapshotPayload{ID: 3, CreatedNano: 1700000000000000000, Size: 1 << 30, Name: "daily.1", UUID: "0f0e0d0c-0b0a-4908-8706-050403020100"}.Encode()
	return b
}

// FuzzSnapshotPayload: random payloads never panic, and whatever decodes
// encodes back to the same bytes.
func FuzzSnapshotPayload(f *testing.F) {
	f.Add(seedSnapPayload())
	f.Add([]byte{})
	f.Add(make([]byte, snapPayloadFixed))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := DecodeSnapshotPayload(b)
		if err != nil {
			return
		}
		re, err := p.Encode()
		if err != nil {
			t.Fatalf("decoded payload does not encode: %v", err)
		}
		if !bytes.Equal(re, b) {
			t.Fatalf("re-encoding differs")
		}
	})
}

// FuzzScan: scanning random ring contents never panics, never reports a
// record that does not decode with a matching CRC, and stops within the
// ring with contiguous LSNs.
func FuzzScan(f *testing.F) {
	ring := make([]byte, 1024)
	writeRing(ring, 0, []Record{
		{LSN: 1, Type: Write, Offset: 0, Length: 300, Gen: 1, Payload: make([]byte, 300)},
		{LSN: 2, Type: Zero, Offset: 4096, Length: 4096, Gen: 1},
		{LSN: 3, Type: Write, Offset: 512, Length: 400, Gen: 2, Payload: bytes.Repeat([]byte{7}, 400)},
		{LSN: 4, Type: Write, Offset: 512, Length: 200, Gen: 2, Payload: bytes.Repeat([]byte{8}, 200)},
	})
	snapRing := make([]byte, 1024)
	sp := seedSnapPayload()
	writeRing(snapRing, 0, []Record{
		{LSN: 1, Type: Write, Offset: 0, Length: 100, Gen: 1, Payload: make([]byte, 100)},
		{LSN: 2, Type: Snapshot, Length: uint32(len(sp)), Gen: 1, Payload: sp},
		{LSN: 3, Type: SnapshotDelete, Length: uint32(len(sp)), Gen: 1, Payload: sp},
	})
	f.Add(snapRing, uint64(0), uint64(1), uint32(0))
	f.Add(ring, uint64(0), uint64(1), uint32(0))
	f.Add(ring, uint64(1024), uint64(1), uint32(2))
	f.Add(make([]byte, 64), uint64(8), uint64(5), uint32(1))
	for _, s := range seedRecords() {
		f.Add(s, uint64(0), uint64(1), uint32(0))
	}
	f.Fuzz(func(t *testing.T, data []byte, from, first uint64, maxGen uint32) {
		size := int64(len(data)) &^ (Align - 1)
		if size < HeaderSize {
			return
		}
		from &^= Align - 1
		if first == 0 {
			first = 1
		}
		rg := Ring{Size: size}
		buf := data[:size]
		next := first
		end := from
		res, err := Scan(bytes.NewReader(buf), rg, ScanOptions{From: from, FirstLSN: first, MaxGen: maxGen}, func(pos uint64, r Record) error {
			if r.LSN != next {
				t.Fatalf("LSN %d, expected %d", r.LSN, next)
			}
			next++
			if pos < end || pos+uint64(r.Size()) > from+uint64(size) {
				t.Fatalf("record at %d outside the scanned range", pos)
			}
			phys := rg.Phys(pos)
			d, n, err := Decode(buf[phys:])
			if err != nil || n != r.Size() || d.LSN != r.LSN {
				t.Fatalf("reported record does not decode: %v", err)
			}
			end = pos + uint64(n)
			return nil
		})
		if err != nil {
			t.Fatalf("scan error on in-memory ring: %v", err)
		}
		if res.LastLSN != next-1 || res.End < end || res.End > from+uint64(size) {
			t.Fatalf("result %+v inconsistent (next %d, end %d)", res, next, end)
		}
	})
}
