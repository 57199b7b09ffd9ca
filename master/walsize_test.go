package master

import (
	"testing"

	"github.com/blockd/blockd/api"
)

// The default WAL follows the volume: the preset's size, but never more
// than twice a small volume (it is reserved on disk at create) and never
// below MinWALSize; an explicit size is kept as given.
func TestDefaultWALSizeFollowsVolume(t *testing.T) {
	const M = 1 << 20
	cases := []struct {
		preset string
		size   int64
		wal    int64
		want   int64
	}{
		{"", 10 << 30, 0, DefaultWALSize},
		{"general", 10 << 30, 0, DefaultWALSize},
		{"database", 10 << 30, 0, LargeWALSize},
		{"", 64 * M, 0, 128 * M},
		{"throughput", 256 * M, 0, 512 * M},
		{"", 256 << 10, 0, MinWALSize},
		{"", 64 * M, 32 * M, 32 * M},
	}
	for _, c := range cases {
		res := Resolve(api.CreateVolumeRequest{Name: "v", Preset: c.preset, SizeBytes: c.size, WALSizeBytes: c.wal, RF: 1}, 3)
		if got := res.Policy.WALSizeBytes; got != c.want {
			t.Errorf("preset %q size %d wal %d: WAL %d, want %d (%+v)", c.preset, c.size, c.wal, got, c.want, res)
		}
	}
}
