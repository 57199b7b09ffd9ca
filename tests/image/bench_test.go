package imagetests

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// BenchmarkExportVsQemuImgConvert: a 1 GiB volume with 256 MiB written
// (64 runs of 4 MiB spread over the volume), snapshot s1; `blockd volume
// export vol0@s1` to a file against `qemu-img convert -O raw` of the same
// snapshot's NBD export (nbd://.../vol0@s1) to a file, alternated in the
// same run. Reported: the median of each and their ratio (goal <= 1.2).
//
//	go test -run XXX -bench ExportVsQemu -benchtime 3x ./tests/image/
func BenchmarkExportVsQemuImgConvert(b *testing.B) {
	s := startServe(b, "1GiB")
	var cmds []string
	for i := 0; i < 64; i++ {
		cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %dM 4M", 1+i, i*16))
	}
	s.mustQemuIO("vol0", cmds...)
	s.mustCLI("snapshot", "create", "vol0", "s1")
	dir := b.TempDir()
	var ours, peer []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		img, raw := filepath.Join(dir, "vol0.img"), filepath.Join(dir, "vol0.raw")
		t0 := time.Now()
		s.mustCLI("volume", "export", "vol0@s1", "--output", img)
		ours = append(ours, time.Since(t0))
		t0 = time.Now()
		run(b, "qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri("vol0@s1"), raw)
		peer = append(peer, time.Since(t0))
		if i == 0 {
			st, _ := os.Stat(img)
			b.Logf("image %d bytes for 256 MiB of data", st.Size())
		}
		os.Remove(img)
		os.Remove(raw)
	}
	b.StopTimer()
	med := func(d []time.Duration) time.Duration {
		d = append([]time.Duration(nil), d...)
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[len(d)/2]
	}
	mo, mp := med(ours), med(peer)
	ratio := float64(mo) / float64(mp)
	b.ReportMetric(ratio, "export/qemu-img")
	b.ReportMetric(mo.Seconds(), "export_s")
	b.ReportMetric(mp.Seconds(), "qemu-img_s")
	b.Logf("EXPORT 1 GiB volume, 256 MiB written: blockd volume export %v, qemu-img convert %v (medians of %d): ratio %.2f (goal <= 1.2) [%s | %s]",
		mo.Round(time.Millisecond), mp.Round(time.Millisecond), len(ours), ratio, fmtDur(ours), fmtDur(peer))
}

func fmtDur(d []time.Duration) string {
	var s []string
	for _, x := range d {
		s = append(s, x.Round(time.Millisecond).String())
	}
	return strings.Join(s, " ")
}
