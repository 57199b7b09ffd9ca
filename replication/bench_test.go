package replication

import (
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func benchVol(b *testing.B, size int64) *blockvol.Volume { return benchVolIn(b, b.TempDir(), size) }

// replicaBenchDir: BLOCKD_BENCH_REPLICA_DIR puts the replica's volume on
// another file system (a second disk stands in for the second server).
func replicaBenchDir(b *testing.B) string {
	if d := os.Getenv("BLOCKD_BENCH_REPLICA_DIR"); d != "" {
		dir, err := os.MkdirTemp(d, "replica")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}
	return b.TempDir()
}

func benchVolIn(b *testing.B, dir string, size int64) *blockvol.Volume {
	b.Helper()
	v, err := blockvol.Create(dir, blockvol.Options{Size: size})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { v.Close() })
	<-v.WALFilled() // measure a written WAL, without the fill's writes beside
	return v
}

// randWriteQD32 runs ops 4 KiB random writes from 32 concurrent workers
// and issues a Flush after every 32nd write; it returns IOPS.
func randWriteQD32(b *testing.B, dev blockdev.Device, ops int) float64 {
	iops, _ := randWriteQD32Flush(b, dev, ops)
	return iops
}

// randWriteQD32Flush is randWriteQD32 that also returns the flushes'
// mean latency in µs.
func randWriteQD32Flush(b *testing.B, dev blockdev.Device, ops int) (iops, flushUS float64) {
	var next, flushNs, flushes atomic.Int64
	var wg sync.WaitGroup
	blocks := dev.Size() / 4096
	start := time.Now()
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			buf := make([]byte, 4096)
			for {
				i := next.Add(1)
				if i > int64(ops) {
					return
				}
				buf[0], buf[1] = byte(i), byte(w)
				if err := dev.WriteAt(buf, rng.Int64N(blocks)*4096, false); err != nil {
					b.Error(err)
					return
				}
				if i%32 == 0 {
					t := time.Now()
					if err := dev.Flush(); err != nil {
						b.Error(err)
						return
					}
					flushNs.Add(int64(time.Since(t)))
					flushes.Add(1)
				}
			}
		}(w)
	}
	wg.Wait()
	iops = float64(ops) / time.Since(start).Seconds()
	if n := flushes.Load(); n > 0 {
		flushUS = float64(flushNs.Load()) / float64(n) / 1e3
	}
	return iops, flushUS
}

func benchWaitInSync(b *testing.B, p *Primary) {
	deadline := time.Now().Add(5 * time.Minute)
	for time.Now().Before(deadline) {
		rs := p.Replicas()
		ok := len(rs) > 0
		for _, r := range rs {
			ok = ok && r.State == InSync
		}
		if ok {
			return
		}
		time.Sleep(time.Millisecond)
	}
	b.Fatalf("replicas not in sync: %+v", p.Replicas())
}

func fill(b *testing.B, v *blockvol.Volume, from, to int64, gen byte) {
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*31) ^ gen
	}
	for off := from; off < to; off += int64(len(buf)) {
		buf[0], buf[1], buf[2], buf[3] = byte(off>>20), byte(off>>28), gen, 1
		if err := v.WriteAt(buf, off, false); err != nil {
			b.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkFullRebuild1GiB: time for a blank replica to reach InSync from
// a full 1 GiB primary over loopback (goal <= 2 s). The peer printed is a
// plain local copy of the same bytes (ReadAt → WriteAt on another volume).
func BenchmarkFullRebuild1GiB(b *testing.B) {
	const size = 1 << 30
	pv := benchVol(b, size)
	fill(b, pv, 0, size, 1)
	if err := pv.ReplCheckpoint(); err != nil {
		b.Fatal(err)
	}
	var dur time.Duration
	for i := 0; i < b.N; i++ {
		rv := benchVol(b, size)
		log := quietLog()
		rec := NewReceiver(ReceiverConfig{ServerID: "r", Logger: log, Lookup: func(string) (ReplicaTarget, bool) {
			return ReplicaTarget{Vol: rv, Epoch: 1, PrimaryID: testPrimaryID}, true
		}})
		ln := mustListen(b)
		go rec.Serve(ln)
		start := time.Now()
		p, err := NewPrimary(pv, PrimaryConfig{Volume: "bench", ServerID: testPrimaryID, Epoch: 1, Durability: SyncAll, Replicas: []Peer{{"r", ln.Addr().String()}}, Logger: log})
		if err != nil {
			b.Fatal(err)
		}
		benchWaitInSync(b, p)
		dur = time.Since(start)
		st := p.Replicas()[0]
		p.Close()
		rec.Close()
		if st.Transfers != 1 {
			b.Fatalf("expected one rebuild, got %+v", st)
		}
	}
	// Peer: a local volume-to-volume copy of the same data.
	cv := benchVol(b, size)
	buf := make([]byte, 1<<20)
	start := time.Now()
	for off := int64(0); off < size; off += int64(len(buf)) {
		pv.ReadAt(buf, off)
		cv.ReplWriteBase(off, buf)
	}
	cv.ReplSyncBase()
	local := time.Since(start)
	b.ReportMetric(dur.Seconds(), "rebuild_s")
	fmt.Printf("full rebuild 1 GiB: %.2f s over loopback (%.0f MiB/s); local copy peer %.2f s; ratio %.2f (goal <= 2 s)\n",
		dur.Seconds(), float64(size>>20)/dur.Seconds(), local.Seconds(), dur.Seconds()/local.Seconds())
}

// BenchmarkResync: time to bring back a replica that was away past WAL
// retention, as a function of the data changed meanwhile (256 MiB volume).
func BenchmarkResync(b *testing.B) {
	const size = 256 << 20
	for _, changed := range []int64{1 << 20, 8 << 20, 64 << 20, 256 << 20} {
		b.Run(fmt.Sprintf("changed=%dMiB", changed>>20), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				pv, rv := benchVol(b, size), benchVol(b, size)
				log := quietLog()
				var mu sync.Mutex
				up := true
				rec := NewReceiver(ReceiverConfig{ServerID: "r", Logger: log, Lookup: func(string) (ReplicaTarget, bool) {
					mu.Lock()
					defer mu.Unlock()
					return ReplicaTarget{Vol: rv, Epoch: 1, PrimaryID: testPrimaryID}, up
				}})
				ln := mustListen(b)
				go rec.Serve(ln)
				p, err := NewPrimary(pv, PrimaryConfig{Volume: "bench", ServerID: testPrimaryID, Epoch: 1, Durability: BestEffort, Replicas: []Peer{{"r", ln.Addr().String()}},
					Logger: log, Retention: RetentionBudget{MaxAge: time.Millisecond, MaxBytes: 1}, RetryMax: 20 * time.Millisecond})
				if err != nil {
					b.Fatal(err)
				}
				benchWaitInSync(b, p)
				fill(b, pv, 0, size, 1) // the common image
				p.Flush()
				benchWaitFlushed(b, p, pv.HeadLSN())
				mu.Lock()
				up = false
				mu.Unlock()
				benchWaitState(b, p, func(s ReplicaState) bool { return s != InSync }, rec)
				fillStrided(b, pv, changed, 2)
				p.Flush()
				// Recycle the WAL past the replica (the persisted-bitmap hold
				// moves at the next checkpoint tick).
				flushed := p.Replicas()[0].FlushedLSN
				for deadline := time.Now().Add(time.Minute); pv.OldestRetainedLSN() <= flushed+1; {
					if time.Now().After(deadline) {
						b.Fatal("WAL never recycled")
					}
					pv.ReplCheckpoint()
					time.Sleep(10 * time.Millisecond)
				}
				mu.Lock()
				up = true
				mu.Unlock()
				start := time.Now()
				benchWaitInSync(b, p)
				d := time.Since(start)
				st := p.Replicas()[0]
				p.Close()
				rec.Close()
				fmt.Printf("resync after %d MiB changed of %d MiB: %.3f s, %d MiB base moved (%d transfers)\n", changed>>20, size>>20, d.Seconds(), st.BaseBytes>>20, st.Transfers)
				b.ReportMetric(d.Seconds(), "resync_s")
			}
		})
	}
}

// fillStrided changes `changed` bytes spread over the volume in 1 MiB runs.
func fillStrided(b *testing.B, v *blockvol.Volume, changed int64, gen byte) {
	n := changed >> 20
	stride := v.Size() / n
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*17) ^ gen
	}
	for k := int64(0); k < n; k++ {
		if err := v.WriteAt(buf, k*stride, false); err != nil {
			b.Fatal(err)
		}
	}
}

func benchWaitFlushed(b *testing.B, p *Primary, lsn uint64) {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if r := p.Replicas(); len(r) > 0 && r[0].FlushedLSN >= lsn {
			return
		}
		time.Sleep(time.Millisecond)
	}
	b.Fatal("replica never flushed")
}

// benchWaitState waits for the replica state to satisfy ok, cutting the
// replica's sessions (the lookup already refuses) so the primary notices.
func benchWaitState(b *testing.B, p *Primary, ok func(ReplicaState) bool, rec *Receiver) {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if r := p.Replicas(); len(r) > 0 && ok(r[0].State) {
			return
		}
		rec.mu.Lock()
		for c := range rec.conns {
			c.Close()
		}
		rec.mu.Unlock()
		time.Sleep(5 * time.Millisecond)
	}
	b.Fatal("replica state never changed")
}
