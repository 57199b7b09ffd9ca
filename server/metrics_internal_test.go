package server

import (
	"errors"
	"math/rand/v2"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
)

// failDev fails every write (to see errors counted).
type failDev struct{ blockdev.Device }

func (failDev) WriteAt([]byte, int64, bool) error { return blockdev.ErrNoSpace }

// TestMeteredDevice: each operation counts its requests, bytes and errors
// on the volume's series, and the wrapper passes results through.
func TestMeteredDevice(t *testing.T) {
	vol, err := blockvol.Create(filepath.Join(t.TempDir(), "v"), blockvol.Options{Size: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	m := newServerMetrics(&Server{}, prometheus.NewRegistry())
	d := &meteredDevice{Device: vol, m: m.meters("v")}
	p := make([]byte, 8192)
	if err := d.WriteAt(p, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := d.ReadAt(p[:4096], 4096); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := d.Trim(0, 4096); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(0, 65536, false); err != nil {
		t.Fatal(err)
	}
	bad := &meteredDevice{Device: failDev{vol}, m: m.meters("v")}
	if err := bad.WriteAt(p, 0, false); !errors.Is(err, blockdev.ErrNoSpace) {
		t.Fatalf("error not passed through: %v", err)
	}
	for _, c := range []struct {
		vec  *prometheus.CounterVec
		op   string
		want float64
	}{
		{m.ops, opWrite, 2}, {m.bytes, opWrite, 16384}, {m.errs, opWrite, 1},
		{m.ops, opRead, 1}, {m.bytes, opRead, 4096}, {m.errs, opRead, 0},
		{m.ops, opFlush, 1}, {m.ops, opTrim, 1}, {m.bytes, opTrim, 4096},
		{m.ops, opZero, 1}, {m.bytes, opZero, 65536},
	} {
		if got := testutil.ToFloat64(c.vec.WithLabelValues("v", c.op)); got != c.want {
			t.Errorf("%s: got %v, want %v", c.op, got, c.want)
		}
	}
	if n := testutil.CollectAndCount(m.lat, "blockd_volume_request_duration_seconds"); n != 5 {
		t.Errorf("latency series: %d, want 5 (one per op)", n)
	}
	m.forget("v")
	if n := testutil.CollectAndCount(m.ops); n != 0 {
		t.Errorf("series left after forget: %d", n)
	}
	if !strings.HasPrefix(m.ops.WithLabelValues("x", "read").Desc().String(), `Desc{fqName: "blockd_`) {
		t.Error("metric name without blockd_ prefix")
	}
}

// BenchmarkMeteredWrite is the hot-path cost of the I/O metrics: 4 KiB
// random writes (no FUA) on one engine, in short rounds alternating with
// and without the wrapper (the order flipped every round) in the same
// run. It reports the median of the per-round on/off time ratios (a
// flusher stall lands in one round and would swamp a sum), goal within
// 5 %, and the ratio of the totals beside it.
func BenchmarkMeteredWrite(b *testing.B) {
	vol, err := blockvol.Create(filepath.Join(b.TempDir(), "v"), blockvol.Options{Size: 256 << 20, WALSize: 64 << 20})
	if err != nil {
		b.Fatal(err)
	}
	defer vol.Close()
	m := newServerMetrics(&Server{}, prometheus.NewRegistry())
	on := blockdev.Device(&meteredDevice{Device: vol, m: m.meters("v")})
	off := blockdev.Device(vol)
	p := make([]byte, 4096)
	blocks := vol.Size() / 4096
	rng := rand.New(rand.NewPCG(1, 2))
	const round = 128
	var ratios []float64
	var tOn, tOff time.Duration
	timeRound := func(dev blockdev.Device) time.Duration {
		t0 := time.Now()
		for j := 0; j < round; j++ {
			if err := dev.WriteAt(p, rng.Int64N(blocks)*4096, false); err != nil {
				b.Fatal(err)
			}
		}
		return time.Since(t0)
	}
	b.ResetTimer()
	for done, k := 0, 0; done < b.N; done, k = done+2*round, k+1 {
		var dOn, dOff time.Duration
		if k%2 == 0 {
			dOff, dOn = timeRound(off), timeRound(on)
		} else {
			dOn, dOff = timeRound(on), timeRound(off)
		}
		tOn, tOff = tOn+dOn, tOff+dOff
		ratios = append(ratios, float64(dOn)/float64(dOff))
	}
	b.StopTimer()
	sort.Float64s(ratios)
	med := ratios[len(ratios)/2]
	b.ReportMetric(med, "on/off")
	b.Logf("4 KiB writes, %d rounds of %d: median on/off %.3f; totals on %v, off %v (%.3f)",
		len(ratios), round, med, tOn, tOff, float64(tOn)/float64(tOff))
}

// nullDev answers every request at once: what is left is the wrapper.
type nullDev struct{ blockdev.Device }

func (nullDev) WriteAt([]byte, int64, bool) error { return nil }

// BenchmarkMeterOverhead is the wrapper's own cost per write (no device
// work): compare it with BenchmarkMeteredWrite's time per write.
func BenchmarkMeterOverhead(b *testing.B) {
	m := newServerMetrics(&Server{}, prometheus.NewRegistry())
	for _, c := range []struct {
		name string
		dev  blockdev.Device
	}{{"off", nullDev{}}, {"on", &meteredDevice{Device: nullDev{}, m: m.meters("v")}}} {
		b.Run(c.name, func(b *testing.B) {
			p := make([]byte, 4096)
			for i := 0; i < b.N; i++ {
				_ = c.dev.WriteAt(p, 0, false)
			}
		})
	}
}
