package vmtest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
)

// cpioWriter writes a "newc" (SVR4, no CRC) archive, the format the kernel
// unpacks into the initramfs. Several archives may be concatenated: the
// kernel unpacks them in order, later entries replacing earlier ones.
type cpioWriter struct {
	w    *bufio.Writer
	ino  uint32
	dirs map[string]bool
	err  error
}

func newCPIO(w io.Writer) *cpioWriter {
	return &cpioWriter{w: bufio.NewWriterSize(w, 1<<20), ino: 1000, dirs: map[string]bool{}}
}

func (c *cpioWriter) header(name string, mode uint32, size int, nlink uint32) {
	if c.err != nil {
		return
	}
	name = strings.TrimPrefix(path.Clean("/"+name), "/")
	c.ino++
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	c.write([]byte(hdr))
	c.write([]byte(name))
	c.write([]byte{0})
	c.pad(len(hdr) + len(name) + 1)
}

func (c *cpioWriter) write(p []byte) {
	if c.err != nil {
		return
	}
	_, c.err = c.w.Write(p)
}

func (c *cpioWriter) pad(n int) {
	if r := n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

// mkdirAll adds the directory and its parents (once per archive).
func (c *cpioWriter) mkdirAll(dir string) {
	dir = strings.TrimPrefix(path.Clean("/"+dir), "/")
	if dir == "" || dir == "." || c.dirs[dir] {
		return
	}
	c.mkdirAll(path.Dir(dir))
	c.dirs[dir] = true
	c.header(dir, 0o040755, 0, 2)
}

// file adds a regular file with the given contents and permission bits.
func (c *cpioWriter) file(name string, data []byte, perm uint32) {
	c.mkdirAll(path.Dir(name))
	c.header(name, 0o100000|perm&0o7777, len(data), 1)
	c.write(data)
	c.pad(len(data))
}

// hostFile adds the host file src as name, keeping its permission bits.
func (c *cpioWriter) hostFile(name, src string) {
	if c.err != nil {
		return
	}
	data, err := os.ReadFile(src)
	if err != nil {
		c.err = fmt.Errorf("vmtest: initramfs: %w", err)
		return
	}
	fi, err := os.Stat(src)
	if err != nil {
		c.err = fmt.Errorf("vmtest: initramfs: %w", err)
		return
	}
	c.file(name, data, uint32(fi.Mode().Perm()))
}

// symlink adds name pointing at target.
func (c *cpioWriter) symlink(name, target string) {
	c.mkdirAll(path.Dir(name))
	c.header(name, 0o120777, len(target), 1)
	c.write([]byte(target))
	c.pad(len(target))
}

// close writes the trailer and flushes.
func (c *cpioWriter) close() error {
	c.header("TRAILER!!!", 0, 0, 1)
	if c.err == nil {
		c.err = c.w.Flush()
	}
	return c.err
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
