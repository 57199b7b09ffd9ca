package wal

import (
	"bytes"
	"errors"
	"testing"
)

func TestEncodeDecodeRoundTrip(t *testing.T) {
	recs := []Record{
		{LSN: 1, Epoch: 2, Type: Write, Offset: 4096, Length: 8, Gen: 3, Payload: []byte("abcdefgh")},
		{LSN: 2, Epoch: 2, Type: Write, Offset: 0, Length: 3, Gen: 3, Payload: []byte("xyz")},
		{LSN: 3, Epoch: 9, Type: Zero, Offset: 1 << 40, Length: 1 << 30, Gen: 3},
		{LSN: 4, Type: Barrier, Gen: 4},
		{LSN: 5, Type: Padding, Length: 16, Gen: 4},
	}
	var buf []byte
	for _, r := range recs {
		buf = Encode(buf, r)
	}
	for i, want := range recs {
		got, n, err := Decode(buf)
		if err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
		if n != want.Size() || n%Align != 0 {
			t.Fatalf("record %d: size %d want %d", i, n, want.Size())
		}
		if got.LSN != want.LSN || got.Epoch != want.Epoch || got.Type != want.Type || got.Offset != want.Offset ||
			got.Length != want.Length || got.Gen != want.Gen || !bytes.Equal(got.Payload, want.Payload) {
			t.Fatalf("record %d: got %+v want %+v", i, got, want)
		}
		buf = buf[n:]
	}
}

func TestDecodeRejectsDamage(t *testing.T) {
	good := Encode(nil, Record{LSN: 7, Type: Write, Offset: 512, Length: 100, Payload: bytes.Repeat([]byte{1}, 100)})
	for i := range good[:HeaderSize+100] {
		for _, bit := range []byte{1, 0x80} {
			b := append([]byte(nil), good...)
			b[i] ^= bit
			if _, _, err := Decode(b); err == nil {
				t.Fatalf("flip of byte %d bit %x decoded as valid", i, bit)
			}
		}
	}
	for n := 0; n < HeaderSize+100; n++ {
		if _, _, err := Decode(good[:n]); !errors.Is(err, ErrShort) {
			t.Fatalf("truncated to %d: %v, want ErrShort", n, err)
		}
	}
}

// writeRing appends records to a ring buffer the way the volume does,
// with padding at the end of a lap.
func writeRing(ring []byte, head uint64, recs []Record) uint64 {
	rg := Ring{Size: int64(len(ring))}
	for _, r := range recs {
		start, gap := rg.Place(head, r.Size())
		if gap >= HeaderSize {
			EncodeInto(ring[rg.Phys(head):], Record{Type: Padding, LSN: r.LSN, Gen: r.Gen, Length: uint32(gap - HeaderSize)})
		}
		EncodeInto(ring[rg.Phys(start):], r)
		head = start + uint64(r.Size())
	}
	return head
}

func TestScanWrapAndTornTail(t *testing.T) {
	ring := make([]byte, 4096)
	rg := Ring{Size: 4096}
	var recs []Record
	for i := 1; i <= 40; i++ {
		recs = append(recs, Record{LSN: uint64(i), Type: Write, Offset: int64(i) * 512, Length: uint32(100 + i*3), Gen: 1, Payload: bytes.Repeat([]byte{byte(i)}, 100+i*3)})
	}
	// First lap: records 1..20; tail then moves to 15; records 21..40 wrap.
	head := writeRing(ring, 0, recs[:20])
	// find position of record 15
	var pos15 uint64
	res, err := Scan(bytes.NewReader(ring), rg, ScanOptions{From: 0, FirstLSN: 1}, func(pos uint64, r Record) error {
		if r.LSN == 15 {
			pos15 = pos
		}
		return nil
	})
	if err != nil || res.LastLSN != 20 || res.End != head {
		t.Fatalf("first lap: %+v %v head %d", res, err, head)
	}
	head = writeRing(ring, head, recs[20:30])
	if head < 4096 {
		t.Fatalf("test did not wrap: head %d", head)
	}
	var seen []uint64
	res, err = Scan(bytes.NewReader(ring), rg, ScanOptions{From: pos15, FirstLSN: 15}, func(pos uint64, r Record) error {
		seen = append(seen, r.LSN)
		if !bytes.Equal(r.Payload, bytes.Repeat([]byte{byte(r.LSN)}, int(r.Length))) {
			t.Fatalf("LSN %d payload damaged", r.LSN)
		}
		return nil
	})
	if err != nil || res.LastLSN != 30 || res.End != head || len(seen) != 16 {
		t.Fatalf("wrapped scan: %+v %v head %d seen %v", res, err, head, seen)
	}
	// Tear the last record: the scan ends before it, without error.
	ring[rg.Phys(head)-10] ^= 0xff
	res, err = Scan(bytes.NewReader(ring), rg, ScanOptions{From: pos15, FirstLSN: 15}, nil)
	if err != nil || res.LastLSN != 29 || res.Stop == nil || !errors.Is(res.Stop, ErrStop) {
		t.Fatalf("torn tail: %+v %v", res, err)
	}
	// A stale record of an older generation after newer ones ends the log.
	r31 := Record{LSN: 31, Type: Barrier, Gen: 0}
	ring[rg.Phys(head)-10] ^= 0xff
	EncodeInto(ring[rg.Phys(head):], r31)
	res, _ = Scan(bytes.NewReader(ring), rg, ScanOptions{From: pos15, FirstLSN: 15}, nil)
	if res.LastLSN != 30 {
		t.Fatalf("stale generation accepted: %+v", res)
	}
}
