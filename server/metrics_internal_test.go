package server

import (
	"errors"
	"math/rand/v2"
	"path/filepath"
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
// random writes (no FUA) on one engine, alternating rounds with and
// without the wrapper in the same run; it reports the on/off ratio of the
// time per write (goal: within 5 %).
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
	var tOn, tOff time.Duration
	const round = 256
	b.ResetTimer()
	for done, k := 0, 0; done < b.N; done, k = done+2*round, k+1 {
		order := []blockdev.Device{off, on}
		if k%2 == 1 {
			order = []blockdev.Device{on, off} // no bias from going first
		}
		for _, dev := range order {
			t0 := time.Now()
			for j := 0; j < round; j++ {
				if err := dev.WriteAt(p, rng.Int64N(blocks)*4096, false); err != nil {
					b.Fatal(err)
				}
			}
			if dev == off {
				tOff += time.Since(t0)
			} else {
				tOn += time.Since(t0)
			}
		}
	}
	b.StopTimer()
	if tOff > 0 {
		b.ReportMetric(float64(tOn)/float64(tOff), "on/off")
		b.Logf("4 KiB writes: metrics on %v, off %v, ratio %.3f", tOn, tOff, float64(tOn)/float64(tOff))
	}
}
