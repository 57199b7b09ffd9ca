package vfs

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestOSFilePunchAllocated(t *testing.T) {
	dir := t.TempDir()
	f, err := Default.OpenFile(filepath.Join(dir, "f"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xaa}, 256<<10)
	if _, err := f.WriteAt(data, 128<<10); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	r, err := f.Allocated(0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(r) != 1 || r[0].Off > 128<<10 || r[0].Off+r[0].Len < 384<<10 {
		t.Fatalf("allocated %+v", r)
	}
	if err := f.PunchHole(192<<10, 64<<10); err != nil {
		t.Fatal(err)
	}
	r, _ = f.Allocated(0, 1<<20)
	if len(r) != 2 {
		t.Fatalf("allocated after punch %+v", r)
	}
	got := make([]byte, 64<<10)
	if _, err := f.ReadAt(got, 192<<10); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, make([]byte, 64<<10)) {
		t.Fatal("punched range does not read as zeroes")
	}
	if st, _ := f.Stat(); st.Size() != 1<<20 {
		t.Fatalf("punch changed the size to %d", st.Size())
	}
	if err := Default.SyncDir(dir); err != nil {
		t.Fatal(err)
	}
}

func TestCrashFSDropsUnsynced(t *testing.T) {
	c := NewCrashFS()
	c.MkdirAll("/d", 0o755)
	f, err := c.OpenFile("/d/a", os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("durable!"), 0)
	f.Sync()
	f.WriteAt([]byte("lost"), 0)
	g, _ := c.OpenFile("/d/b", os.O_RDWR|os.O_CREATE, 0o644) // never SyncDir'd after
	c.SyncDir("/d")
	g.WriteAt([]byte("x"), 0)
	h, _ := c.OpenFile("/d/c", os.O_RDWR|os.O_CREATE, 0o644)
	h.WriteAt([]byte("y"), 0)
	h.Sync() // data synced but the entry never was

	n := c.PowerCut(CutOptions{})
	if _, err := f.WriteAt([]byte("z"), 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write after power cut: %v", err)
	}
	a, err := n.OpenFile("/d/a", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	a.ReadAt(buf, 0)
	if string(buf) != "durable!" {
		t.Fatalf("after cut: %q", buf)
	}
	if st, err := n.Stat("/d/b"); err != nil || st.Size() != 0 {
		t.Fatalf("b: %v %v", st, err)
	}
	if _, err := n.Stat("/d/c"); err == nil {
		t.Fatal("file without a synced directory entry survived")
	}
}

func TestCrashFSTearAndKeep(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 1))
	sawTear := false
	for i := 0; i < 50; i++ {
		c := NewCrashFS()
		c.MkdirAll("/d", 0o755)
		f, _ := c.OpenFile("/d/a", os.O_RDWR|os.O_CREATE, 0o644)
		c.SyncDir("/d")
		f.WriteAt(bytes.Repeat([]byte{1}, 4096), 0)
		f.WriteAt(bytes.Repeat([]byte{2}, 4096), 4096)
		n := c.PowerCut(CutOptions{KeepProb: 1, Tear: true, Rand: r})
		a, _ := n.OpenFile("/d/a", os.O_RDWR, 0)
		buf := make([]byte, 8192)
		k, _ := a.ReadAt(buf, 0)
		if !bytes.Equal(buf[:4096], bytes.Repeat([]byte{1}, 4096)) {
			t.Fatal("kept write lost")
		}
		if k < 8192 {
			sawTear = true
			if k%512 != 0 || k == 8192 {
				t.Fatalf("tear not at a sector boundary: %d", k)
			}
		}
	}
	if !sawTear {
		t.Fatal("no torn write in 50 tries")
	}
}

func TestCrashFSFaults(t *testing.T) {
	c := NewCrashFS()
	c.MkdirAll("/d", 0o755)
	f, _ := c.OpenFile("/d/wal", os.O_RDWR|os.O_CREATE, 0o644)
	c.Inject(Fault{Op: OpWrite, Name: "wal", Skip: 1, Count: 1, Err: syscall.ENOSPC})
	if _, err := f.WriteAt([]byte("a"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("b"), 0); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("second write: %v", err)
	}
	if _, err := f.WriteAt([]byte("c"), 0); err != nil {
		t.Fatalf("third write: %v", err)
	}
	c.Inject(Fault{Op: OpSync, Err: syscall.EIO})
	if err := f.Sync(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("sync: %v", err)
	}
}
