package blockvol

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/blockd/blockd/blockdev"
)

func TestExpand(t *testing.T) {
	v, dir := newVol(t, 1<<20, 256<<10)
	last := pattern(1, 4096)
	if err := v.WriteAt(last, 1<<20-4096, false); err != nil {
		t.Fatal(err)
	}
	if err := v.WriteAt(last, 1<<20, false); !errors.Is(err, blockdev.ErrOutOfRange) {
		t.Fatalf("write past the end before expand: %v", err)
	}
	// Expand while writers run: Drain makes it wait for them.
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < 50; j++ {
				_ = v.WriteAt(pattern(uint64(i*100+j), 4096), int64(i)*4096, false)
			}
		}(i)
	}
	if err := v.Expand(4 << 20); err != nil {
		t.Fatalf("expand: %v", err)
	}
	wg.Wait()
	if v.Size() != 4<<20 {
		t.Fatalf("size %d after expand", v.Size())
	}
	grown := pattern(2, 8192)
	if err := v.WriteAt(grown, 3<<20, true); err != nil {
		t.Fatalf("write in the new range: %v", err)
	}
	if got := mustRead(t, v, 2<<20, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("new range does not read as zeroes")
	}
	for _, c := range []struct {
		size int64
		want error
	}{{2 << 20, blockdev.ErrInvalid}, {4<<20 + 512, blockdev.ErrMisaligned}} {
		if err := v.Expand(c.size); !errors.Is(err, c.want) {
			t.Errorf("expand to %d: %v, want %v", c.size, err, c.want)
		}
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer v2.Close()
	if v2.Size() != 4<<20 {
		t.Fatalf("size %d after reopen", v2.Size())
	}
	if got := mustRead(t, v2, 3<<20, 8192); !bytes.Equal(got, grown) {
		t.Fatal("data in the new range lost across reopen")
	}
	if got := mustRead(t, v2, 1<<20-4096, 4096); !bytes.Equal(got, last) {
		t.Fatal("data before the old end lost across reopen")
	}
}

// An expand interrupted after the extent grew but before the superblock
// recorded it is rolled back on open; a short extent is refused.
func TestExpandInterrupted(t *testing.T) {
	v, dir := newVol(t, 1<<20, 256<<10)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	ext := filepath.Join(dir, ExtentFile)
	if err := os.Truncate(ext, 2<<20); err != nil {
		t.Fatal(err)
	}
	v2, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("open after an interrupted expand: %v", err)
	}
	if v2.Size() != 1<<20 {
		t.Fatalf("size %d, want the committed 1 MiB", v2.Size())
	}
	if err := v2.Close(); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(ext); st.Size() != 1<<20 {
		t.Fatalf("extent is %d bytes after roll-back", st.Size())
	}
	if err := os.Truncate(ext, 512<<10); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, Options{Logger: testLogger(t)}); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("short extent: %v, want ErrCorrupt", err)
	}
}
