package imagetests

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/image"
)

// TestExportImportChain: a full export of s1 equals an nbdcopy capture
// taken at snapshot time (not the live volume written after it); the
// export -> import round trip reads the same with qemu-img compare; a diff
// s1 -> s2 applied on top reproduces s2; the importing volume gets s1 and
// s2 with the source's UUIDs.
func TestExportImportChain(t *testing.T) {
	s := startServe(t, "256MiB")
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	s.mustQemuIO("vol0", "write -P 0xab 1M 3M", "write -P 0x11 100M 64k", "write -P 0x22 255M 1M")
	s.mustCLI("snapshot", "create", "vol0", "s1")
	s.capture("vol0", p("s1.raw"))
	// Changes after s1: data, a zeroed range inside s1's data, a trim.
	s.mustQemuIO("vol0", "write -P 0xcd 2M 512k", "write -z 1M 256k", "discard 100M 64k", "write -P 0x33 200M 2M")
	s.mustCLI("snapshot", "create", "vol0", "s2")
	s.capture("vol0", p("s2.raw"))
	s.mustQemuIO("vol0", "write -P 0xef 0 1M") // live now differs from s2

	s.mustCLI("volume", "export", "vol0@s1", "--output", p("s1.img"))
	h := decodeTo(t, p("s1.img"), p("s1.decoded"))
	sameFile(t, p("s1.decoded"), p("s1.raw"))
	// The same snapshot through NBD (VOLUME@SNAP), copied by nbdcopy.
	s.capture("vol0@s1", p("s1.nbd"))
	sameFile(t, p("s1.decoded"), p("s1.nbd"))
	if h.Kind != image.Full || h.SourceName != "s1" || h.SourceUUID == "" {
		t.Fatalf("header %+v", h)
	}
	if st, _ := os.Stat(p("s1.img")); st.Size() > 6<<20 {
		t.Fatalf("image of 4.1 MiB of data is %d bytes: not sparse", st.Size())
	}
	out := s.mustCLI("volume", "export", "vol0@s2", "--since", "s1", "--output", p("d12.img"), "-o", "json")
	var ex map[string]any
	if err := json.Unmarshal([]byte(out), &ex); err != nil || ex["kind"] != "diff" {
		t.Fatalf("export -o json: %v %s", err, out)
	}
	if ex["data_bytes"].(float64) > 4<<20 {
		t.Fatalf("diff carries %v data bytes, more than what changed", ex["data_bytes"])
	}

	s.mustCLI("volume", "create", "vol1", "--size", "256MiB", "--rf", "1")
	s.waitVolume("vol1")
	s.mustCLI("volume", "import", "vol1", "--input", p("s1.img"))
	s.sameAs("vol1", p("s1.raw"))
	s.mustCLI("volume", "import", "vol1", "--input", p("d12.img"))
	s.sameAs("vol1", p("s2.raw"))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", s.uri("vol0@s2"), s.uri("vol1@s2"))
	var snaps []struct{ Name, UUID string }
	for _, vol := range []string{"vol0", "vol1"} {
		var list []struct{ Name, UUID string }
		if err := json.Unmarshal([]byte(s.mustCLI("snapshot", "list", vol, "-o", "json")), &list); err != nil {
			t.Fatal(err)
		}
		if vol == "vol0" {
			snaps = list
			continue
		}
		if len(list) != 2 || list[0] != snaps[0] || list[1] != snaps[1] {
			t.Fatalf("vol1 snapshots %+v, want vol0's %+v (same names and UUIDs)", list, snaps)
		}
	}

	// The live export goes through a temporary snapshot that is gone after.
	s.mustCLI("volume", "export", "vol0", "--output", p("live.img"))
	s.capture("vol0", p("live.raw"))
	decodeTo(t, p("live.img"), p("live.decoded"))
	sameFile(t, p("live.decoded"), p("live.raw"))
	if l := s.mustCLI("snapshot", "list", "vol0"); strings.Contains(l, "export-") {
		t.Fatalf("temporary export snapshot left behind:\n%s", l)
	}

	// Clone: a new volume with s1's bytes and s1 itself.
	s.mustCLI("volume", "clone", "vol0@s1", "vol2")
	s.sameAs("vol2", p("s1.raw"))
	if l := s.mustCLI("snapshot", "list", "vol2"); !strings.Contains(l, "s1") {
		t.Fatalf("clone has no s1:\n%s", l)
	}
}

// TestBadImagesChangeNothing: every refusal names its cause in one line
// and the target volume reads exactly as before.
func TestBadImagesChangeNothing(t *testing.T) {
	s := startServe(t, "128MiB")
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	s.mustQemuIO("vol0", "write -P 0x5a 0 2M", "write -P 0x6b 64M 1M")
	s.mustCLI("snapshot", "create", "vol0", "s1")
	s.mustQemuIO("vol0", "write -P 0x7c 1M 1M")
	s.mustCLI("snapshot", "create", "vol0", "s2")
	s.mustQemuIO("vol0", "write -P 0x8d 3M 1M")
	s.mustCLI("snapshot", "create", "vol0", "s3")
	s.mustCLI("volume", "export", "vol0@s1", "--output", p("s1.img"))
	s.mustCLI("volume", "export", "vol0@s3", "--since", "s2", "--output", p("d23.img"))
	s.mustCLI("volume", "export", "vol0@s2", "--since", "s1", "--output", p("d12.img"))

	s.mustCLI("volume", "create", "vol1", "--size", "128MiB", "--rf", "1")
	s.waitVolume("vol1")
	s.mustQemuIO("vol1", "write -P 0x99 5M 1M")
	s.capture("vol1", p("vol1.before"))
	unchanged := func() {
		t.Helper()
		s.sameAs("vol1", p("vol1.before"))
	}

	img, _ := os.ReadFile(p("s1.img"))
	if err := os.WriteFile(p("trunc.img"), img[:len(img)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	flip := append([]byte(nil), img...)
	flip[len(flip)/3] ^= 0x10
	if err := os.WriteFile(p("flip.img"), flip, 0o644); err != nil {
		t.Fatal(err)
	}
	s.cliFails("image truncated", "volume", "import", "vol1", "--input", p("trunc.img"), "--force")
	unchanged()
	s.cliFails("image corrupt", "volume", "import", "vol1", "--input", p("flip.img"), "--force")
	unchanged()
	s.cliFails("holds data", "volume", "import", "vol1", "--input", p("s1.img"))
	unchanged()
	s.cliFails("wrong base", "volume", "import", "vol1", "--input", p("d23.img"))
	unchanged()
	// The corrupt and truncated image left no staging file and no
	// pending snapshot behind.
	if l := s.mustCLI("snapshot", "list", "vol1"); strings.Contains(l, "import-pending") {
		t.Fatalf("pending snapshot left:\n%s", l)
	}
	if m, _ := filepath.Glob(filepath.Join(s.dataDir, "*", "volumes", "vol1", "import-*")); len(m) > 0 {
		t.Fatalf("import files left: %v", m)
	}

	// --force takes the full image over the data.
	s.mustCLI("volume", "export", "vol0@s1", "--output", p("s1b.img"))
	s.capture("vol0", p("vol0.now"))
	s.mustCLI("volume", "import", "vol1", "--input", p("s1.img"), "--force")
	decodeTo(t, p("s1.img"), p("s1.raw"))
	s.sameAs("vol1", p("s1.raw"))
	s.capture("vol1", p("vol1.before"))
	s.cliFails("already imported", "volume", "import", "vol1", "--input", p("s1b.img"))
	unchanged()
	// A diff onto a volume that changed since its base.
	s.mustQemuIO("vol1", "write -P 0x42 7M 4k")
	s.capture("vol1", p("vol1.before"))
	s.cliFails("changed since", "volume", "import", "vol1", "--input", p("d12.img"))
	unchanged()

	// Exports of a deleted or unknown snapshot, and --since not older.
	s.mustCLI("snapshot", "create", "vol0", "gone")
	s.mustCLI("snapshot", "delete", "vol0", "gone")
	s.cliFails(`no snapshot "gone"`, "volume", "export", "vol0@gone", "--output", p("x.img"))
	s.cliFails(`no snapshot "nope"`, "volume", "export", "vol0@s2", "--since", "nope", "--output", p("x.img"))
	s.cliFails("not older", "volume", "export", "vol0@s1", "--since", "s2", "--output", p("x.img"))
	s.cliFails(`volume "nosuch" not found`, "volume", "export", "nosuch@s1", "--output", p("x.img"))
	if _, err := os.Stat(p("x.img")); err == nil {
		t.Fatal("a refused export left an output file")
	}
	s.cliFails("not a blockd image", "volume", "import", "vol1", "--input", p("vol0.now"))
	unchanged()
}

// TestConcurrentLiveExports: four exports of the live volume at once each
// take their own temporary snapshot (the earlier system's fixed temporary
// snapshot ID made concurrent exports collide); all succeed, verify, and
// leave no snapshot behind.
func TestConcurrentLiveExports(t *testing.T) {
	s := startServe(t, "128MiB")
	dir := t.TempDir()
	s.mustQemuIO("vol0", "write -P 0x5a 0 8M", "write -P 0x6b 64M 8M")
	s.capture("vol0", filepath.Join(dir, "vol0.raw"))
	errs := make(chan error, 4)
	for i := range 4 {
		go func() {
			_, err := s.cli("volume", "export", "vol0", "--output", filepath.Join(dir, fmt.Sprintf("e%d.img", i)))
			errs <- err
		}()
	}
	for range 4 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	if t.Failed() {
		return
	}
	for i := range 4 {
		raw := filepath.Join(dir, fmt.Sprintf("e%d.raw", i))
		decodeTo(t, filepath.Join(dir, fmt.Sprintf("e%d.img", i)), raw)
		sameFile(t, raw, filepath.Join(dir, "vol0.raw"))
	}
	if l := s.mustCLI("snapshot", "list", "vol0"); strings.Contains(l, "export-") {
		t.Fatalf("temporary snapshots left:\n%s", l)
	}
}
