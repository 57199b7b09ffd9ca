package wal

import (
	"bytes"
	"testing"
)

// With GenLSN, a record at or after it must be of generation MaxGen even
// when the scan starts right on it (no newer record before it to compare
// with); padding of an older generation before a MaxGen record at the
// start of the next lap is kept.
func TestScanGenLSN(t *testing.T) {
	const size = 4096
	rg := Ring{Size: size}
	rec := func(lsn uint64, gen uint32) Record {
		p := bytes.Repeat([]byte{byte(lsn)}, 1000)
		return Record{LSN: lsn, Type: Write, Length: 1000, Gen: gen, Payload: p}
	}
	// Generation 1 wrote LSNs 1..4 (the fourth does not fit the lap: it
	// follows a padding); generation 2 began at LSN 3.
	ring := make([]byte, size)
	writeRing(ring, 0, []Record{rec(1, 1), rec(2, 1), rec(3, 1)})
	pos3 := uint64(2 * rec(1, 1).Size())
	for _, gl := range []uint64{0, 3} {
		res, err := Scan(bytes.NewReader(ring), rg, ScanOptions{From: pos3, FirstLSN: 3, MaxGen: 2, GenLSN: gl}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if want := map[uint64]uint64{0: 3, 3: 2}[gl]; res.LastLSN != want {
			t.Fatalf("GenLSN %d: scan from a generation-1 record at LSN 3 ends at LSN %d, want %d (%v)", gl, res.LastLSN, want, res.Stop)
		}
	}

	// Generation 1 wrote LSN 3 after a padding that carries LSN 3; the
	// recovery that began generation 2 found LSN 3 torn and ended past
	// the padding, and generation 2 wrote its LSN 3 at the lap start.
	ring = make([]byte, size)
	head := writeRing(ring, 0, []Record{rec(1, 1), rec(2, 1), rec(3, 1), rec(4, 1)})
	lapStart := uint64(size)
	if head <= lapStart {
		t.Fatalf("test did not wrap: head %d", head)
	}
	writeRing(ring, lapStart, []Record{rec(4, 2)})
	pos4 := uint64(3 * rec(1, 1).Size())
	res, err := Scan(bytes.NewReader(ring), rg, ScanOptions{From: pos4, FirstLSN: 4, MaxGen: 2, GenLSN: 4}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.LastLSN != 4 || res.LastGen != 2 {
		t.Fatalf("generation 2's LSN 4 after generation 1's padding: %+v", res)
	}
}
