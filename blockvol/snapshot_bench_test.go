package blockvol

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkRandReadSnapshots: 4 KiB random reads of the live volume (8
// goroutines) on two volumes with the same data, one without snapshots
// and one with 100 snapshots each taken after 1 MiB of random writes,
// measured alternately in the same run. ratio is the throughput with 100
// snapshots over the throughput with none (goal: at least 0.9).
//
//	go test ./blockvol -run '^$' -bench RandReadSnapshots -benchtime 200000x
func BenchmarkRandReadSnapshots(b *testing.B) {
	const size, nsnaps = 256 << 20, 100
	dir := benchDir(b)
	mk := func(name string, snaps bool) *Volume {
		v, err := Create(filepath.Join(dir, name), Options{Size: size, WALSize: 64 << 20})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { v.Close() })
		buf := pattern(1, 4<<20)
		for off := int64(0); off < size; off += int64(len(buf)) {
			if err := v.WriteAt(buf, off, false); err != nil {
				b.Fatal(err)
			}
		}
		r := rand.New(rand.NewPCG(2, 3))
		blk := pattern(2, 4096)
		for k := 0; k < nsnaps; k++ {
			for i := 0; i < 256; i++ {
				if err := v.WriteAt(blk, int64(r.IntN(size/4096))*4096, false); err != nil {
					b.Fatal(err)
				}
			}
			if snaps {
				if _, err := v.CreateSnapshot(fmt.Sprintf("s%d", k), SnapshotOptions{}); err != nil {
					b.Fatal(err)
				}
			}
		}
		if err := v.Flush(); err != nil {
			b.Fatal(err)
		}
		waitCheckpoint(b, v)
		return v
	}
	v0 := mk("none", false)
	v1 := mk("snaps", true)
	if n := len(v1.Snapshots()); n != nsnaps {
		b.Fatalf("%d snapshots", n)
	}
	read := func(v *Volume, n int) (time.Duration, time.Duration, error) {
		return parallelOps(8, n, func(r *rand.Rand) error {
			var p [4096]byte
			return v.ReadAt(p[:], int64(r.IntN(size/4096))*4096)
		})
	}
	// Warm both page caches alike.
	if _, _, err := read(v0, 20000); err != nil {
		b.Fatal(err)
	}
	if _, _, err := read(v1, 20000); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	w0, w1, c0, c1, err := interleave(b.N, func(snaps bool, n int) (time.Duration, time.Duration, error) {
		if snaps {
			return read(v1, n)
		}
		return read(v0, n)
	})
	if err != nil {
		b.Fatal(err)
	}
	ns0, ns1 := float64(w0.Nanoseconds())/float64(b.N), float64(w1.Nanoseconds())/float64(b.N)
	b.ReportMetric(ns0, "0snap-ns/op")
	b.ReportMetric(ns1, "100snap-ns/op")
	b.ReportMetric(ns0/ns1, "ratio")
	b.ReportMetric(float64(c0.Nanoseconds())/float64(b.N), "0snap-cpu-ns/op")
	b.ReportMetric(float64(c1.Nanoseconds())/float64(b.N), "100snap-cpu-ns/op")
	b.ReportMetric(float64(c0.Nanoseconds())/float64(c1.Nanoseconds()), "cpu-ratio")
	b.ReportMetric(0, "ns/op")
	b.Logf("4k randread, %d ops: %.0f ns/op with no snapshot, %.0f ns/op with %d: throughput ratio %.3f", b.N, ns0, ns1, nsnaps, ns0/ns1)
}
