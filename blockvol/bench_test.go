package blockvol

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
)

// Benchmarks print the engine's figures next to a raw-file baseline
// measured in the same run on the same disk (the directory of
// $BLOCKVOL_BENCH_DIR, default the test temp dir):
//
//	raw-*: pwrite/fdatasync on a plain preallocated file of the same size
//	vol-*: the same operations through a Volume
//	ratio: vol / raw (time per op; lower is better)
//
//	go test ./blockvol -run '^$' -bench . -benchtime 2s

var benchVolSize = flag.Int64("bench.size", 1<<30, "volume size for the benchmarks")

func benchDir(b testing.TB) string {
	if d := os.Getenv("BLOCKVOL_BENCH_DIR"); d != "" {
		dir, err := os.MkdirTemp(d, "bench")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}
	return b.TempDir()
}

// rawFile is the baseline: a preallocated, written-through file.
func rawFile(b testing.TB, dir string, size int64) vfs.File {
	f, err := vfs.Default.OpenFile(filepath.Join(dir, "raw"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	if err := f.Allocate(0, size); err != nil {
		b.Fatal(err)
	}
	fillZeroes(b, f, size)
	b.Cleanup(func() { f.Close() })
	return f
}

func fillZeroes(b testing.TB, f vfs.File, size int64) {
	z := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(z)) {
		if _, err := f.WriteAt(z[:min(int64(len(z)), size-off)], off); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
}

// benchVolume creates a volume whose WAL has been written once, as it is
// after its first lap in service (a fresh WAL is only fallocated, and
// the first write to each of its blocks costs an extent conversion).
func benchVolume(b testing.TB, dir string, size, walSize int64) *Volume {
	v, err := Create(filepath.Join(dir, "vol"), Options{Size: size, WALSize: walSize})
	if err != nil {
		b.Fatal(err)
	}
	fillZeroes(b, v.walF, v.walSize)
	b.Cleanup(func() { v.Close() })
	return v
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// parallelOps runs n ops split over workers goroutines and returns the
// wall time and the process CPU time used.
func parallelOps(workers, n int, op func(r *rand.Rand) error) (time.Duration, time.Duration, error) {
	var wg sync.WaitGroup
	var left atomic.Int64
	left.Store(int64(n))
	var firstErr atomic.Pointer[error]
	c0, t0 := cpuTime(), time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 77))
			for left.Add(-1) >= 0 {
				if err := op(r); err != nil {
					firstErr.CompareAndSwap(nil, &err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	wall, cpu := time.Since(t0), cpuTime()-c0
	if p := firstErr.Load(); p != nil {
		return wall, cpu, *p
	}
	return wall, cpu, nil
}

func report(b *testing.B, n int, rawWall, volWall, rawCPU, volCPU time.Duration) {
	rawNs := float64(rawWall.Nanoseconds()) / float64(n)
	volNs := float64(volWall.Nanoseconds()) / float64(n)
	b.ReportMetric(rawNs, "raw-ns/op")
	b.ReportMetric(volNs, "vol-ns/op")
	b.ReportMetric(volNs/rawNs, "ratio")
	if rawCPU > 0 {
		b.ReportMetric(float64(rawCPU.Nanoseconds())/float64(n), "raw-cpu-ns/op")
		b.ReportMetric(float64(volCPU.Nanoseconds())/float64(n), "vol-cpu-ns/op")
	}
	b.ReportMetric(0, "ns/op") // the pair above is the result
}

// interleave runs the raw and the volume variant alternately in rounds of
// about n/rounds ops each, so that a noisy neighbour or background
// writeback hits both alike, and sums wall and CPU time per variant.
func interleave(n int, fn func(vol bool, n int) (time.Duration, time.Duration, error)) (rawWall, volWall, rawCPU, volCPU time.Duration, err error) {
	const rounds = 32
	for r := 0; r < rounds; r++ {
		k := n / rounds
		if r == rounds-1 {
			k = n - k*(rounds-1)
		}
		if k == 0 {
			continue
		}
		w, c, err := fn(false, k)
		if err != nil {
			return 0, 0, 0, 0, err
		}
		rawWall, rawCPU = rawWall+w, rawCPU+c
		w, c, err = fn(true, k)
		if err != nil {
			return 0, 0, 0, 0, err
		}
		volWall, volCPU = volWall+w, volCPU+c
	}
	return
}

// BenchmarkRandWrite4k: 4 KiB random writes from 32 goroutines (QD32),
// acknowledged in the page cache (each round ends with one flush).
func BenchmarkRandWrite4k(b *testing.B) {
	dir := benchDir(b)
	size := *benchVolSize
	raw := rawFile(b, dir, size)
	v := benchVolume(b, dir, size, 0)
	nb := size / 4096
	b.ResetTimer()
	rawWall, volWall, rawCPU, volCPU, err := interleave(b.N, func(vol bool, n int) (time.Duration, time.Duration, error) {
		w, c, err := parallelOps(32, n, func(r *rand.Rand) error {
			var buf [4096]byte
			if vol {
				return v.WriteAt(buf[:], r.Int64N(nb)*4096, false)
			}
			_, err := raw.WriteAt(buf[:], r.Int64N(nb)*4096)
			return err
		})
		if err == nil {
			if vol {
				err = v.Flush()
			} else {
				err = raw.Sync()
			}
		}
		return w, c, err
	})
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	report(b, b.N, rawWall, volWall, rawCPU, volCPU)
}

// BenchmarkHotSetRandWrite: 4 KiB random writes from 32 goroutines over a
// 256 MiB hot set of a 1 GiB volume with the default WAL, flusher running,
// until everything is checkpointed. It reports the flusher's extent
// pwrites per client write (rewrites absorbed in the log and neighbouring
// blocks merged bring it below 1) and the CPU per write, flusher included.
func BenchmarkHotSetRandWrite(b *testing.B) {
	dir := benchDir(b)
	v := benchVolume(b, dir, 1<<30, 0)
	const hot = (256 << 20) / 4096
	fw0 := v.flushWrites.Load()
	b.ResetTimer()
	wall, cpu, err := parallelOps(32, b.N, func(r *rand.Rand) error {
		var buf [4096]byte
		return v.WriteAt(buf[:], r.Int64N(hot)*4096, false)
	})
	if err != nil {
		b.Fatal(err)
	}
	c0 := cpuTime()
	waitCheckpoint(b, v)
	cpu += cpuTime() - c0
	b.StopTimer()
	b.ReportMetric(float64(v.flushWrites.Load()-fw0)/float64(b.N), "extent-pwrites/write")
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
	b.ReportMetric(float64(wall.Nanoseconds())/float64(b.N), "wall-ns/op")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkQD1WriteFlush: one writer, 4 KiB write then flush: the latency
// a database's commit sees. Goal: <= 1.2x raw pwrite+fdatasync. Raw is
// measured twice: random offsets (the same I/O as the volume's clients)
// and sequential offsets (the pattern of the WAL, the stricter peer):
// ratio is against random, seq-ratio against sequential.
func BenchmarkQD1WriteFlush(b *testing.B) {
	dir := benchDir(b)
	size := *benchVolSize
	raw := rawFile(b, dir, size)
	v := benchVolume(b, dir, size, 0)
	nb := size / 4096
	buf := make([]byte, 4096)
	r := rand.New(rand.NewPCG(1, 2))
	var seqWall time.Duration
	seq := int64(0)
	syncs0 := v.gc.syncs.Load()
	b.ResetTimer()
	rawWall, volWall, _, _, err := interleave(b.N, func(vol bool, n int) (time.Duration, time.Duration, error) {
		t0 := time.Now()
		for i := 0; i < n; i++ {
			if vol {
				if err := v.WriteAt(buf, r.Int64N(nb)*4096, false); err != nil {
					return 0, 0, err
				}
				if err := v.Flush(); err != nil {
					return 0, 0, err
				}
				continue
			}
			if _, err := raw.WriteAt(buf, r.Int64N(nb)*4096); err != nil {
				return 0, 0, err
			}
			if err := raw.Sync(); err != nil {
				return 0, 0, err
			}
		}
		w := time.Since(t0)
		if !vol {
			t1 := time.Now()
			for i := 0; i < n; i++ {
				if _, err := raw.WriteAt(buf, seq%nb*4096); err != nil {
					return 0, 0, err
				}
				seq++
				if err := raw.Sync(); err != nil {
					return 0, 0, err
				}
			}
			seqWall += time.Since(t1)
		}
		return w, 0, nil
	})
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	report(b, b.N, rawWall, volWall, 0, 0)
	b.ReportMetric(float64(seqWall.Nanoseconds())/float64(b.N), "raw-seq-ns/op")
	b.ReportMetric(float64(volWall)/float64(seqWall), "seq-ratio")
	b.ReportMetric(float64(v.gc.syncs.Load()-syncs0)/float64(b.N), "fdatasync/flush")
}

// BenchmarkGroupCommit16: 16 goroutines each looping write+flush. Raw:
// each does its own pwrite+fdatasync on a shared file.
func BenchmarkGroupCommit16(b *testing.B) {
	dir := benchDir(b)
	size := *benchVolSize
	raw := rawFile(b, dir, size)
	v := benchVolume(b, dir, size, 0)
	nb := size / 4096
	syncs0 := v.gc.syncs.Load()
	b.ResetTimer()
	rawWall, volWall, rawCPU, volCPU, err := interleave(b.N, func(vol bool, n int) (time.Duration, time.Duration, error) {
		return parallelOps(16, n, func(r *rand.Rand) error {
			var buf [4096]byte
			if vol {
				if err := v.WriteAt(buf[:], r.Int64N(nb)*4096, false); err != nil {
					return err
				}
				return v.Flush()
			}
			if _, err := raw.WriteAt(buf[:], r.Int64N(nb)*4096); err != nil {
				return err
			}
			return raw.Sync()
		})
	})
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	report(b, b.N, rawWall, volWall, rawCPU, volCPU)
	b.ReportMetric(float64(b.N)/float64(v.gc.syncs.Load()-syncs0), "flushes/fdatasync")
}

// BenchmarkRecoveryFullWAL: open a volume whose WAL is ~90% full of
// unflushed 4 KiB writes (a crash under load). Raw: reading the same
// number of bytes sequentially from a file. Both from the page cache.
func BenchmarkRecoveryFullWAL(b *testing.B) {
	dir := benchDir(b)
	const walSize = 256 << 20
	size := int64(1 << 30)
	volDir := filepath.Join(dir, "vol")
	v := benchVolume(b, dir, size, walSize)
	v.pauseFlusher.Store(true)
	buf := make([]byte, 4096)
	r := rand.New(rand.NewPCG(3, 4))
	for v.head-v.ckptPos.Load() < walSize*9/10 {
		if err := v.WriteAt(buf, r.Int64N(size/4096)*4096, false); err != nil {
			b.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		b.Fatal(err)
	}
	records := v.HeadLSN() - v.CheckpointLSN()
	v.abandon() // a crash: no checkpoint, no close-time flush
	raw := rawFile(b, dir, walSize)
	rbuf := make([]byte, 1<<20)
	b.ResetTimer()
	var rawWall, volWall time.Duration
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		for off := int64(0); off < walSize*9/10; off += int64(len(rbuf)) {
			if _, err := raw.ReadAt(rbuf, off); err != nil {
				b.Fatal(err)
			}
		}
		rawWall += time.Since(t0)
		t0 = time.Now()
		v2, err := Open(volDir, Options{})
		volWall += time.Since(t0)
		if err != nil {
			b.Fatal(err)
		}
		if v2.HeadLSN()-v2.CheckpointLSN() != records {
			b.Fatalf("recovered %d records, want %d", v2.HeadLSN()-v2.CheckpointLSN(), records)
		}
		v2.pauseFlusher.Store(true)
		v2.abandon()
	}
	b.StopTimer()
	report(b, b.N, rawWall, volWall, 0, 0)
	b.ReportMetric(float64(records), "records")
	b.ReportMetric(float64(walSize*9/10)/(float64(volWall.Nanoseconds())/float64(b.N))*1e9/(1<<20), "vol-MiB/s")
}

// BenchmarkDirtyMapMemory reports the heap bytes the dirty map uses per
// dirty block (1M random blocks of a 64 GiB volume).
func BenchmarkDirtyMapMemory(b *testing.B) {
	const n = 1 << 20
	var per float64
	for i := 0; i < min(b.N, 1); i++ { // one measurement whatever b.N
		var d dirtyMap
		runtime.GC()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		d.init()
		r := rand.New(rand.NewPCG(5, 6))
		for d.len() < n {
			d.putRange(r.Uint64N(16<<20), 1, r.Uint64N(1<<40)&^7, 4096)
		}
		runtime.GC()
		runtime.ReadMemStats(&m1)
		per = float64(m1.HeapAlloc-m0.HeapAlloc) / n
		runtime.KeepAlive(&d)
	}
	b.ReportMetric(per, "bytes/dirty-block")
	b.ReportMetric(0, "ns/op")
}

var sustained = flag.Duration("sustained", 0, "run TestSustainedRandomWrites for this long (e.g. 60s)")

// TestSustainedRandomWrites: 32 writers doing 4 KiB random writes (1 in 64
// followed by a flush) as fast as the disk takes them, on a volume with
// the default WAL, for -sustained (or $BLOCKVOL_SUSTAINED). No write may
// fail or time out; it reports throughput and the slowest write.
func TestSustainedRandomWrites(t *testing.T) {
	d := *sustained
	if s := os.Getenv("BLOCKVOL_SUSTAINED"); s != "" && d == 0 {
		d, _ = time.ParseDuration(s)
	}
	if d == 0 {
		t.Skip("set -sustained=60s or BLOCKVOL_SUSTAINED=60s")
	}
	dir := benchDir(t)
	size := *benchVolSize
	v, err := Create(filepath.Join(dir, "vol"), Options{Size: size, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	nb := size / 4096
	deadline := time.Now().Add(d)
	var ops, slowest atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, 32)
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(w), 1))
			buf := make([]byte, 4096)
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := v.WriteAt(buf, r.Int64N(nb)*4096, false); err != nil {
					errc <- err
					return
				}
				if r.IntN(64) == 0 {
					if err := v.Flush(); err != nil {
						errc <- err
						return
					}
				}
				if l := int64(time.Since(t0)); l > slowest.Load() {
					slowest.Store(l)
				}
				ops.Add(1)
			}
		}(w)
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	mb := float64(ops.Load()) * 4096 / (1 << 20) / d.Seconds()
	t.Logf("%d writes in %v: %.0f IOPS, %.1f MiB/s, slowest write(+flush) %v, WAL %d MiB, checkpoint lag %d LSNs",
		ops.Load(), d, float64(ops.Load())/d.Seconds(), mb, time.Duration(slowest.Load()), v.walSize>>20, v.HeadLSN()-v.CheckpointLSN())
	fmt.Fprintln(os.Stderr)
}
