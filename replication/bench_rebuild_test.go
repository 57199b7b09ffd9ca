package replication

import (
	"bytes"
	"fmt"
	"os"
	"sort"
	"testing"
	"time"

	"github.com/blockd/blockd/blockvol"
)

// scratchVol is a volume removed by the returned func (the benchmark
// makes a dozen 1 GiB volumes; they do not wait for its end).
func scratchVol(b *testing.B, size int64) (*blockvol.Volume, func()) {
	b.Helper()
	dir, err := os.MkdirTemp("", "rebuild-bench")
	if err != nil {
		b.Fatal(err)
	}
	v, err := blockvol.Create(dir, blockvol.Options{Size: size})
	if err != nil {
		os.RemoveAll(dir)
		b.Fatal(err)
	}
	<-v.WALFilled() // the fill's writes would share the disk with the copy
	return v, func() { v.Close(); os.RemoveAll(dir) }
}

// rebuildOnce rebuilds a fresh replica of pv over loopback and returns
// how long it took until the replica was in sync, and the replica.
func rebuildOnce(b *testing.B, pv *blockvol.Volume) (time.Duration, *blockvol.Volume, func()) {
	b.Helper()
	rv, drop := scratchVol(b, pv.Size())
	log := quietLog()
	rec := NewReceiver(ReceiverConfig{ServerID: "r", Logger: log, Lookup: func(string) (ReplicaTarget, bool) {
		return ReplicaTarget{Vol: rv, Epoch: 1, PrimaryID: testPrimaryID}, true
	}})
	ln := mustListen(b)
	go rec.Serve(ln)
	defer rec.Close()
	start := time.Now()
	p, err := NewPrimary(pv, PrimaryConfig{Volume: "bench", ServerID: testPrimaryID, Epoch: 1, Durability: SyncAll,
		Replicas: []Peer{{"r", ln.Addr().String()}}, Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	benchWaitInSync(b, p)
	d := time.Since(start)
	if st := p.Replicas()[0]; st.Transfers != 1 {
		b.Fatalf("expected one rebuild, got %+v", st)
	}
	return d, rv, drop
}

// BenchmarkRebuildAllocated: a rebuild costs what is allocated, not the
// volume's size. Three 1 GiB volumes: full, 64 MiB written in 1 MiB
// pieces spread over it, and 64 MiB written at its start; each rebuilt
// over loopback, alternated round by round, against a local copy of the
// full volume's bytes (read and written through the same engine calls a
// rebuild uses). Goals: the full rebuild at most 1.1x the local copy, a
// 64 MiB one at most 0.15x the full one. Each replica is compared with
// its primary afterwards.
func BenchmarkRebuildAllocated(b *testing.B) {
	const size = 1 << 30
	full, spread, head := benchVol(b, size), benchVol(b, size), benchVol(b, size)
	fill(b, full, 0, size, 1)
	fillStrided(b, spread, 64<<20, 2)
	fill(b, head, 0, 64<<20, 3)
	for _, v := range []*blockvol.Volume{full, spread, head} {
		if err := v.ReplCheckpoint(); err != nil {
			b.Fatal(err)
		}
	}
	rounds := 3
	var tFull, tSpread, tHead, tLocal []float64
	for i := 0; i < b.N; i++ {
		for r := 0; r < rounds; r++ {
			cv, dropCopy := scratchVol(b, size)
			buf := make([]byte, 1<<20)
			start := time.Now()
			for off := int64(0); off < size; off += int64(len(buf)) {
				if err := full.ReadAt(buf, off); err != nil {
					b.Fatal(err)
				}
				if err := cv.ReplWriteBase(off, buf); err != nil {
					b.Fatal(err)
				}
			}
			if err := cv.ReplSyncBase(); err != nil {
				b.Fatal(err)
			}
			tLocal = append(tLocal, time.Since(start).Seconds())
			dropCopy()
			for _, c := range []struct {
				v   *blockvol.Volume
				out *[]float64
			}{{full, &tFull}, {spread, &tSpread}, {head, &tHead}} {
				d, rv, drop := rebuildOnce(b, c.v)
				*c.out = append(*c.out, d.Seconds())
				if r == 0 {
					sameBytes(b, c.v, rv)
				}
				drop()
			}
		}
	}
	mf, ms, mh, ml := median(tFull), median(tSpread), median(tHead), median(tLocal)
	b.ReportMetric(mf, "full_s")
	fmt.Printf("rebuild 1 GiB (median of %d rounds): full %.2f s, local copy peer %.2f s: ratio %.2f (goal <= 1.1)\n", len(tFull), mf, ml, mf/ml)
	fmt.Printf("rebuild 1 GiB with 64 MiB written: spread %.3f s (%.3fx full), at the start %.3f s (%.3fx full) (goal <= 0.15x)\n",
		ms, ms/mf, mh, mh/mf)
}

// sameBytes compares two volumes in 1 MiB reads.
func sameBytes(b *testing.B, a, c *blockvol.Volume) {
	b.Helper()
	x, y := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < a.Size(); off += int64(len(x)) {
		if err := a.ReadAt(x, off); err != nil {
			b.Fatal(err)
		}
		if err := c.ReadAt(y, off); err != nil {
			b.Fatal(err)
		}
		if !bytes.Equal(x, y) {
			b.Fatalf("rebuilt replica differs from its primary at %d", off)
		}
	}
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	return s[len(s)/2]
}
