package vfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"unsafe"
)

// alignedBuf is n bytes at a DirectAlign boundary.
func alignedBuf(n int) []byte {
	b := make([]byte, n+DirectAlign)
	skip := (DirectAlign - int(uintptr(unsafe.Pointer(&b[0]))%DirectAlign)) % DirectAlign
	return b[skip : skip+n]
}

// A direct write lands where a buffered one would, reads back through the
// page cache, and an unaligned buffer, offset or length is refused with
// ErrNoDirect before anything is written.
func TestWriteAtDirect(t *testing.T) {
	name := filepath.Join(t.TempDir(), "f")
	f, err := Default.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	// Something in the page cache over the range first: the direct write
	// must replace it for readers.
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xee}, 128<<10), 64<<10); err != nil {
		t.Fatal(err)
	}
	d, ok := f.(DirectWriter)
	if !ok {
		t.Fatal("the OS file does not implement DirectWriter")
	}
	p := alignedBuf(128 << 10)
	for i := range p {
		p[i] = byte(i*7 + i/4096)
	}
	n, err := d.WriteAtDirect(p, 64<<10)
	if errors.Is(err, ErrNoDirect) {
		t.Fatalf("direct write refused on %s (a filesystem without O_DIRECT?)", filepath.Dir(name))
	}
	if err != nil || n != len(p) {
		t.Fatalf("direct write: %d, %v", n, err)
	}
	got := make([]byte, len(p))
	if _, err := f.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, p))
	}
	for _, c := range []struct {
		what string
		p    []byte
		off  int64
	}{
		{"unaligned buffer", alignedBuf(8192 + 512)[512:], 0},
		{"unaligned offset", alignedBuf(8192), 512},
		{"unaligned length", alignedBuf(8192)[:4096+512], 0},
		{"empty", nil, 0},
	} {
		if n, err := d.WriteAtDirect(c.p, c.off); !errors.Is(err, ErrNoDirect) || n != 0 {
			t.Errorf("%s: %d, %v; want 0, ErrNoDirect", c.what, n, err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close (both descriptors): %v", err)
	}
}
