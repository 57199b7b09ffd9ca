package server

import (
	"bytes"
	"strings"
	"testing"

	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/image"
)

// TestCheckImportFits: the import rules as a function of the volume's
// state and the image's header (no sockets): full only into an empty
// volume, diff only onto its unchanged base with the same UUID, no second
// import of one source, the size and block size must fit; --force lifts
// the content rules but not the geometry ones.
func TestCheckImportFits(t *testing.T) {
	vol, err := blockvol.Create(t.TempDir(), blockvol.Options{Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	full := image.Header{Kind: image.Full, BlockSize: 4096, Size: 8 << 20, SourceName: "s1", SourceUUID: "u-s1"}
	check := func(name string, h image.Header, force bool, wantFill bool, want string) {
		t.Helper()
		fill, reason := checkImportFits(vol, h, force)
		if want == "" && reason != "" || want != "" && !strings.Contains(reason, want) {
			t.Errorf("%s: reason %q, want %q", name, reason, want)
		}
		if want == "" && fill != wantFill {
			t.Errorf("%s: fill %v, want %v", name, fill, wantFill)
		}
	}
	check("full into empty", full, false, false, "")
	big := full
	big.Size = 16 << 20
	check("too big", big, true, false, "this volume has 8388608 bytes")
	small := full
	small.BlockSize = 512
	check("smaller block size", small, true, false, "not a multiple")

	if err := vol.WriteAt(bytes.Repeat([]byte{1}, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	check("full into data", full, false, false, "holds data")
	check("full into data, forced", full, true, true, "")

	s1, err := vol.CreateSnapshot("s1", blockvol.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	again := full
	again.SourceUUID = s1.UUID
	check("second import", again, false, false, "already imported")
	other := full
	other.SourceName, other.SourceUUID = "x", "u-x"
	check("full over snapshots", other, false, false, "snapshot(s) (s1)")

	diff := image.Header{Kind: image.Diff, BlockSize: 4096, Size: 8 << 20, BaseName: "s1", BaseUUID: s1.UUID,
		SourceName: "s2", SourceUUID: "u-s2"}
	check("diff onto its base", diff, false, false, "")
	wrong := diff
	wrong.BaseUUID = "u-other"
	check("diff, same name other uuid", wrong, false, false, "wrong base: snapshot \"s1\" here has uuid")
	missing := diff
	missing.BaseName = "s0"
	check("diff, no base", missing, false, false, "which this volume does not have")
	if err := vol.WriteAt(bytes.Repeat([]byte{2}, 4096), 8192, false); err != nil {
		t.Fatal(err)
	}
	check("diff onto a changed volume", diff, false, false, "changed since the diff's base snapshot \"s1\" (4096 bytes in 1 ranges)")
	check("diff onto a changed volume, forced", diff, true, false, "")
}
