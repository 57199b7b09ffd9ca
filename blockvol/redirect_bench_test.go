package blockvol

import (
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkSeqWrite1M: 1 MiB sequential writes at 8 writers over a
// 256 MiB region, then a flush, through a Volume with large writes
// written once (redirect.go) and through one with every write in the WAL
// (Options.NoRedirect), alternated in the same run on the same disk. It
// prints both rates and their ratio, and the flusher's extent writes.
//
//	go test ./blockvol -run '^$' -bench SeqWrite1M -benchtime 3x
func BenchmarkSeqWrite1M(b *testing.B) {
	const region, bs, writers = 256 << 20, 1 << 20, 8
	dir := benchDir(b)
	open := func(name string, noRedirect bool) *Volume {
		v, err := Create(filepath.Join(dir, name), Options{Size: 1 << 30, NoRedirect: noRedirect, Logger: testLogger(b)})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { v.Close() })
		return v
	}
	once, logged := open("once", false), open("wal", true)
	buf := make([]byte, bs)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	run := func(v *Volume, laps int) time.Duration {
		t0 := time.Now()
		done := make(chan error, writers)
		for w := 0; w < writers; w++ {
			go func(w int) {
				var err error
				for off := int64(w) * bs; off < int64(laps)*region && err == nil; off += writers * bs {
					err = v.WriteAt(buf, off%region, false)
				}
				done <- err
			}(w)
		}
		for w := 0; w < writers; w++ {
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		}
		if err := v.Flush(); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	run(once, 1)
	run(logged, 1)
	var tOnce, tWAL time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if i%2 == 0 {
			tOnce += run(once, 4)
			tWAL += run(logged, 4)
		} else {
			tWAL += run(logged, 4)
			tOnce += run(once, 4)
		}
	}
	b.StopTimer()
	mb := float64(b.N) * 4 * region / (1 << 20)
	b.ReportMetric(mb/tOnce.Seconds(), "MiB/s-once")
	b.ReportMetric(mb/tWAL.Seconds(), "MiB/s-wal")
	b.ReportMetric(tWAL.Seconds()/tOnce.Seconds(), "once/wal-speedup")
	b.Logf("1 MiB writes QD%d: written once %.0f MiB/s, through the WAL %.0f MiB/s (%.2fx); redirected writes %d, flusher extent writes once %d / wal %d",
		writers, mb/tOnce.Seconds(), mb/tWAL.Seconds(), tWAL.Seconds()/tOnce.Seconds(), once.Stats().RedirectWrites, once.flushWrites.Load(), logged.flushWrites.Load())
}
