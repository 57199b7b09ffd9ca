package nbdtests

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestNbdinfo: every capability blockd advertises, the size, the block
// sizes, base:allocation, the export list and the allocation map.
func TestNbdinfo(t *testing.T) {
	s := startServer(t)
	out := run(t, time.Minute, "nbdinfo", "--json", s.uri())
	var info struct {
		Protocol   string `json:"protocol"`
		Structured bool   `json:"structured"`
		Exports    []struct {
			Name       string   `json:"export-name"`
			Contexts   []string `json:"contexts"`
			ReadOnly   bool     `json:"is_read_only"`
			Rotational bool     `json:"is_rotational"`
			Cache      bool     `json:"can_cache"`
			DF         bool     `json:"can_df"`
			FastZero   bool     `json:"can_fast_zero"`
			Flush      bool     `json:"can_flush"`
			FUA        bool     `json:"can_fua"`
			MultiConn  bool     `json:"can_multi_conn"`
			Trim       bool     `json:"can_trim"`
			Zero       bool     `json:"can_zero"`
			MinBlock   int      `json:"block_size_minimum"`
			PrefBlock  int      `json:"block_size_preferred"`
			MaxBlock   int      `json:"block_size_maximum"`
			Size       int64    `json:"export-size"`
		} `json:"exports"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if info.Protocol != "newstyle-fixed" || !info.Structured || len(info.Exports) != 1 {
		t.Fatalf("negotiation: %s", out)
	}
	e := info.Exports[0]
	if e.Name != "vol0" || e.Size != volSize {
		t.Fatalf("export %q size %d", e.Name, e.Size)
	}
	if !e.Flush || !e.FUA || !e.MultiConn || !e.Trim || !e.Zero || !e.FastZero || !e.Cache || !e.DF || e.ReadOnly || e.Rotational {
		t.Fatalf("capabilities: %s", out)
	}
	if e.MinBlock != 512 || e.PrefBlock != 4096 || e.MaxBlock != 32<<20 {
		t.Fatalf("block sizes %d/%d/%d", e.MinBlock, e.PrefBlock, e.MaxBlock)
	}
	if len(e.Contexts) != 1 || e.Contexts[0] != "base:allocation" {
		t.Fatalf("contexts %v", e.Contexts)
	}
	// The empty export name selects the only export.
	if out := run(t, time.Minute, "nbdinfo", "--size", "nbd://"+s.addr); strings.TrimSpace(out) != fmt.Sprint(volSize) {
		t.Fatalf("default export size %q", out)
	}
	list := run(t, time.Minute, "nbdinfo", "--list", "nbd://"+s.addr)
	if !strings.Contains(list, `export="vol0"`) {
		t.Fatalf("--list:\n%s", list)
	}
	// An unknown export is refused with the server's reason.
	if out, err := runErr(t, time.Minute, "nbdinfo", "nbd://"+s.addr+"/nope"); err == nil || !strings.Contains(out, "nope") {
		t.Fatalf("unknown export accepted or reason missing: %v\n%s", err, out)
	}
	// Allocation map: a fresh volume is a hole; after a write, data.
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(), "-c", "write -P 0x11 1M 1M")
	m := run(t, time.Minute, "nbdinfo", "--map", s.uri())
	if !strings.Contains(m, "data") || !strings.Contains(m, "hole") {
		t.Fatalf("map does not show both data and holes:\n%s", m)
	}
}

// TestFio: 4 connections (multi-conn), QD32, crc32c verify, then a mixed
// random read/write run.
func TestFio(t *testing.T) {
	s := startServer(t)
	out := run(t, 5*time.Minute, "fio", "--name=verify", "--ioengine=nbd", "--uri="+s.uri(),
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=4", "--size=32m", "--offset_increment=32m",
		"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--group_reporting", "--output-format=json")
	checkFio(t, out, true, true)
	out = run(t, 5*time.Minute, "fio", "--name=mixed", "--ioengine=nbd", "--uri="+s.uri(),
		"--rw=randrw", "--rwmixread=60", "--bsrange=4k-64k", "--iodepth=16", "--numjobs=2", "--size=64m",
		"--time_based", "--runtime=5", "--group_reporting", "--output-format=json")
	checkFio(t, out, true, true)
}

func checkFio(t *testing.T, out string, wantRead, wantWrite bool) {
	t.Helper()
	i := strings.Index(out, "{")
	if i < 0 {
		t.Fatalf("no fio json:\n%s", out)
	}
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				IOs int64 `json:"total_ios"`
			} `json:"read"`
			Write struct {
				IOs int64 `json:"total_ios"`
			} `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out[i:]), &res); err != nil {
		t.Fatalf("fio json: %v\n%s", err, out)
	}
	for _, j := range res.Jobs {
		if j.Error != 0 || (wantRead && j.Read.IOs == 0) || (wantWrite && j.Write.IOs == 0) {
			t.Fatalf("fio job: error %d, %d reads, %d writes\n%s", j.Error, j.Read.IOs, j.Write.IOs, out)
		}
	}
}

// TestQemu: qemu-io pattern writes read back by a second qemu-io process,
// qemu-img convert in both directions and qemu-img compare.
func TestQemu(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(),
		"-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 1M 64k", "-c", "write -P 0xef 511M 4k",
		"-c", "write -z 2M 1M", "-c", "flush")
	out := run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(),
		"-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 1M 64k", "-c", "read -P 0xef 511M 4k",
		"-c", "read -P 0 2M 1M", "-c", "read -P 0 900M 1M")
	if strings.Contains(out, "fail") {
		t.Fatalf("pattern read back:\n%s", out)
	}
	// A wrong pattern must fail: the check itself can fail.
	if out, _ := runErr(t, time.Minute, "qemu-io", "-f", "raw", s.uri(), "-c", "read -P 0x99 0 4k"); !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("wrong pattern not detected:\n%s", out)
	}
	src := filepath.Join(dir, "src.raw")
	writeRandomFile(t, src, 48<<20, 1)
	run(t, 2*time.Minute, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, s.uri())
	back := filepath.Join(dir, "back.raw")
	run(t, 2*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri(), back)
	sameFiles(t, src, back, 48<<20)
	// compare needs equal sizes: grow the local copy to the export size,
	// and zero what the pattern writes left beyond the copied range.
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(), "-c", "write -z 511M 4k")
	if err := os.Truncate(src, volSize); err != nil {
		t.Fatal(err)
	}
	run(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri())
	// And compare notices a difference.
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(), "-c", "write -P 0x42 40M 4k")
	if out, err := runErr(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri()); err == nil {
		t.Fatalf("compare missed a difference:\n%s", out)
	}
}

// TestNbdcopy: multi-connection bulk copy in and out.
func TestNbdcopy(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	writeRandomFile(t, src, 64<<20, 2)
	run(t, 2*time.Minute, "nbdcopy", "--connections=4", src, s.uri())
	dst := filepath.Join(dir, "dst.raw")
	run(t, 2*time.Minute, "nbdcopy", "--connections=4", s.uri(), dst)
	sameFiles(t, src, dst, 64<<20)
	fi, err := os.Stat(dst)
	if err != nil || fi.Size() != volSize {
		t.Fatalf("copied size %v %v", fi.Size(), err)
	}
}

// TestNbdshBadRequests: requests a careful client never sends (strict mode
// off), each answered with the right errno; then the same connection and a
// new one still work.
func TestNbdshBadRequests(t *testing.T) {
	s := startServer(t)
	script := `
import errno, nbd
h.set_strict_mode(0)
size = h.get_size()
def expect(fn, want, what):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != want:
            raise SystemExit("%s: errno %s, want %s (%s)" % (what, e.errnum, want, e.string))
        return
    raise SystemExit("%s: succeeded, want errno %d" % (what, want))
expect(lambda: h.pread(4096, size), errno.EINVAL, "read beyond the end")
expect(lambda: h.pread(4096, size - 512), errno.EINVAL, "read across the end")
expect(lambda: h.pwrite(b"x" * 4096, size - 512), errno.ENOSPC, "write across the end")
expect(lambda: h.pwrite(b"x" * 4096, 1 << 50), errno.ENOSPC, "write far beyond the end")
expect(lambda: h.pread(100, 0), errno.EINVAL, "misaligned length")
expect(lambda: h.pread(512, 7), errno.EINVAL, "misaligned offset")
expect(lambda: h.pwrite(b"y" * 1000, 512), errno.EINVAL, "misaligned write")
expect(lambda: h.pread(33 << 20, 0), errno.EOVERFLOW, "read over the maximum block size")
expect(lambda: h.pwrite(b"z" * (33 << 20), 0), errno.EOVERFLOW, "write over the maximum block size")
expect(lambda: h.trim(4096, size), errno.ENOSPC, "trim beyond the end")
expect(lambda: h.zero(4096, size - 512), errno.ENOSPC, "zero across the end")
expect(lambda: h.block_status(4096, size, lambda *a: 0), errno.EINVAL, "block status beyond the end")
# The same connection still serves.
h.pwrite(b"\x5a" * 65536, 1 << 20)
h.flush()
assert h.pread(65536, 1 << 20) == b"\x5a" * 65536, "read back on the same connection"
h2 = nbd.NBD()
h2.connect_uri(URI)
assert h2.pread(65536, 1 << 20) == b"\x5a" * 65536, "read back on a new connection"
h2.shutdown()
print("ALL OK")
`
	script = strings.ReplaceAll(script, "URI", fmt.Sprintf("%q", s.uri()))
	out := run(t, 2*time.Minute, "nbdsh", "-u", s.uri(), "-c", script)
	if !strings.Contains(out, "ALL OK") {
		t.Fatalf("nbdsh:\n%s", out)
	}
	// After all that, a third client (qemu-io) is served too.
	out = run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(), "-c", "read -P 0x5a 1M 64k")
	if strings.Contains(out, "fail") {
		t.Fatal(out)
	}
}
