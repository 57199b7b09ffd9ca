package vfs

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// cutAtEveryOp runs write on a fresh CrashFS holding old at /d/f (nil:
// no file), cutting the power after each possible number of operations,
// with several policies for the unsynced writes, and returns every state
// a reboot found that is neither old (or absent) nor new, or that lost
// new although write had returned nil.
func cutAtEveryOp(t *testing.T, old, new []byte, write func(FS, string, []byte) error) []string {
	t.Helper()
	const path = "/d/f"
	setup := func() *CrashFS {
		c := NewCrashFS()
		if err := c.MkdirAll("/d", 0o755); err != nil {
			t.Fatal(err)
		}
		if old != nil {
			f, err := c.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(old, 0); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if err := c.SyncDir("/d"); err != nil {
				t.Fatal(err)
			}
		}
		return c
	}
	clean := setup()
	base := clean.Ops()
	if err := write(clean, path, new); err != nil {
		t.Fatalf("write without a power cut: %v", err)
	}
	ops := clean.Ops() - base
	cuts := []CutOptions{{}, {KeepProb: 1}, {KeepProb: 1, Tear: true}}
	for seed := uint64(1); seed <= 8; seed++ {
		cuts = append(cuts, CutOptions{KeepProb: 0.5, Tear: true, Rand: rand.New(rand.NewPCG(seed, 7))})
	}
	var bad []string
	for k := int64(0); k <= ops; k++ {
		for i, o := range cuts {
			c := setup()
			c.CutAfter(k)
			err := write(c, path, new)
			if o.Rand == nil {
				o.Rand = rand.New(rand.NewPCG(uint64(k), uint64(i)))
			}
			n := c.PowerCut(o)
			got, rerr := ReadFile(n, path)
			switch {
			case errors.Is(rerr, os.ErrNotExist) && old == nil && err != nil:
			case rerr != nil:
				bad = append(bad, fmt.Sprintf("cut after %d ops (%+v), write err %v: read: %v", k, o, err, rerr))
			case bytes.Equal(got, new):
			case err == nil:
				bad = append(bad, fmt.Sprintf("cut after %d ops: write returned nil but the file holds %d bytes %.40q", k, len(got), got))
			case old != nil && bytes.Equal(got, old):
			default:
				bad = append(bad, fmt.Sprintf("cut after %d ops (keep %.1f tear %v), write err %v: file holds %d bytes %.40q", k, o.KeepProb, o.Tear, err, len(got), got))
			}
		}
	}
	return bad
}

// TestWriteFileAtomicPowerCut: a power cut at any operation of
// WriteFileAtomic leaves the old content or the new one, never a torn or
// empty file, and the new one once it has returned nil.
func TestWriteFileAtomicPowerCut(t *testing.T) {
	old := bytes.Repeat([]byte("old content. "), 100)
	new := bytes.Repeat([]byte("the new content, longer than the old one. "), 100)
	for _, tc := range []struct {
		name     string
		old, new []byte
	}{
		{"replace", old, new},
		{"shrink", new, old},
		{"create", nil, new},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, b := range cutAtEveryOp(t, tc.old, tc.new, func(fs FS, p string, d []byte) error {
				return WriteFileAtomic(fs, p, d, 0o644)
			}) {
				t.Error(b)
			}
		})
	}
}

// TestPowerCutCheckCatchesInPlaceWrite: the check above fails a writer
// that truncates and rewrites the file in place (even with an fsync), so
// it can tell a durable writer from one that is not.
func TestPowerCutCheckCatchesInPlaceWrite(t *testing.T) {
	old := bytes.Repeat([]byte("old content. "), 100)
	new := bytes.Repeat([]byte("the new content. "), 100)
	bad := cutAtEveryOp(t, old, new, func(fs FS, p string, d []byte) error {
		f, err := fs.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.WriteAt(d, 0); err != nil {
			return err
		}
		return f.Sync()
	})
	if len(bad) == 0 {
		t.Fatal("an in-place rewrite passed the power-cut check")
	}
	t.Logf("in-place rewrite: %d bad states, e.g. %s", len(bad), bad[0])
}

// TestWriteFileAtomicFailureKeepsOld: a failing fsync or rename returns an
// error naming the file and the step, keeps the old content and leaves no
// temporary file.
func TestWriteFileAtomicFailureKeepsOld(t *testing.T) {
	for _, op := range []Op{OpWrite, OpSync, OpRename, OpOpen} {
		t.Run(string(op), func(t *testing.T) {
			c := NewCrashFS()
			c.MkdirAll("/d", 0o755)
			if err := WriteFileAtomic(c, "/d/f", []byte("old"), 0o644); err != nil {
				t.Fatal(err)
			}
			c.Inject(Fault{Op: op, Err: syscall.ENOSPC})
			err := WriteFileAtomic(c, "/d/f", []byte("new"), 0o644)
			if !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "/d/f") {
				t.Fatalf("err %v, want ENOSPC naming /d/f", err)
			}
			c.ClearFaults()
			if got, err := ReadFile(c, "/d/f"); err != nil || string(got) != "old" {
				t.Fatalf("after a failed write: %q %v", got, err)
			}
			if files := c.Files(); len(files) != 1 {
				t.Fatalf("files left: %v", files)
			}
		})
	}
}

// TestWriteFileAtomicOS: on the real file system the file gets the
// content and mode asked for, and concurrent writers of one path leave
// one complete content and no temporary file.
func TestWriteFileAtomicOS(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	if err := WriteFileAtomic(Default, p, []byte("first"), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(p)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("stat: %v %v", st, err)
	}
	var wg sync.WaitGroup
	want := map[string]bool{}
	for i := range 8 {
		d := strings.Repeat(fmt.Sprintf("writer %d ", i), 1000+i*100)
		want[d] = true
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := WriteFileAtomic(Default, p, []byte(d), 0o600); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	got, err := ReadFile(Default, p)
	if err != nil || !want[string(got)] {
		t.Fatalf("after concurrent writes: %d bytes, %v", len(got), err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("directory holds %d entries, want only state.json", len(ents))
	}
}

// TestRemoveAll: RemoveAll removes a tree on both file systems; on the
// crash FS the removal survives a power cut only once the parent
// directory is synced.
func TestRemoveAll(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "v", "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "v", "sub", "x"), []byte("x"), 0o644)
	if err := Default.RemoveAll(filepath.Join(dir, "v")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "v")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("os: %v", err)
	}
	if err := Default.RemoveAll(filepath.Join(dir, "missing")); err != nil {
		t.Fatalf("missing path: %v", err)
	}

	for _, synced := range []bool{false, true} {
		c := NewCrashFS()
		c.MkdirAll("/d/v/sub", 0o755)
		for _, p := range []string{"/d/keep", "/d/v/a", "/d/v/sub/b"} {
			if err := WriteFileAtomic(c, p, []byte(p), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.RemoveAll("/d/v"); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Stat("/d/v/sub/b"); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("crash fs: %v", err)
		}
		if synced {
			c.SyncDir("/d")
		}
		n := c.PowerCut(CutOptions{})
		_, err := ReadFile(n, "/d/v/sub/b")
		if synced != errors.Is(err, os.ErrNotExist) {
			t.Fatalf("synced=%v: after the cut /d/v/sub/b: %v", synced, err)
		}
		if got, err := ReadFile(n, "/d/keep"); err != nil || string(got) != "/d/keep" {
			t.Fatalf("sibling: %q %v", got, err)
		}
	}
}
