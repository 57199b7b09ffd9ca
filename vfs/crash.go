package vfs

import (
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Op names a file operation for fault injection.
type Op string

const (
	OpOpen     Op = "open"
	OpRead     Op = "read"
	OpWrite    Op = "write"
	OpSync     Op = "sync"
	OpTruncate Op = "truncate"
	OpPunch    Op = "punch"
	OpAllocate Op = "allocate"
	OpRemove   Op = "remove"
	OpRename   Op = "rename"
	OpSyncDir  Op = "syncdir"
)

// Fault fails matching operations of a CrashFS.
type Fault struct {
	Op Op
	// Name matches files whose base name equals it ("" matches all).
	Name string
	// Skip lets this many matching operations succeed first.
	Skip int
	// Count is how many operations fail after that (0: all of them).
	Count int
	// Err is the error returned (e.g. syscall.EIO, syscall.ENOSPC).
	Err error
}

// CrashFS is an in-memory file system that remembers, per file, what has
// been made durable by Sync (and, per directory, by SyncDir). PowerCut
// returns the file system as a machine would find it after losing power:
// every write not covered by a sync dropped (or, optionally, some kept and
// the last one torn at a sector boundary). Faults make chosen operations
// fail. It is safe for concurrent use; every operation is atomic.
type CrashFS struct {
	mu     sync.Mutex
	names  map[string]*inode // current namespace
	dnames map[string]*inode // durable namespace
	dirs   map[string]bool
	faults []*faultState
	dead   bool
	ops    int64
	cutAt  int64 // > 0: the operation numbered cutAt and every later one fail (CutAfter)
}

type faultState struct {
	Fault
	seen, failed int
}

type inode struct {
	cur     []byte
	dur     []byte
	pending []pendingOp // not yet synced, in order
}

type pendingOp struct {
	kind Op // OpWrite, OpPunch, OpTruncate, OpAllocate
	off  int64
	data []byte // OpWrite
	n    int64  // OpPunch, OpAllocate length; OpTruncate size
}

// NewCrashFS returns an empty crash-simulating file system.
func NewCrashFS() *CrashFS {
	return &CrashFS{names: map[string]*inode{}, dnames: map[string]*inode{}, dirs: map[string]bool{"/": true}}
}

// Inject adds a fault.
func (c *CrashFS) Inject(f Fault) {
	c.mu.Lock()
	c.faults = append(c.faults, &faultState{Fault: f})
	c.mu.Unlock()
}

// ClearFaults removes every fault.
func (c *CrashFS) ClearFaults() {
	c.mu.Lock()
	c.faults = nil
	c.mu.Unlock()
}

// Ops is the number of operations performed so far.
func (c *CrashFS) Ops() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ops
}

// CutAfter lets the next n operations (those that Ops counts) succeed and
// fails every later one with EIO, as if the power went at that point;
// PowerCut then shows what a reboot finds. It is how a test cuts the power
// in the middle of a sequence it does not control step by step.
func (c *CrashFS) CutAfter(n int64) {
	c.mu.Lock()
	c.cutAt = c.ops + n + 1
	c.mu.Unlock()
}

// check runs under c.mu at the start of every operation.
func (c *CrashFS) check(op Op, name string) error {
	c.ops++
	if c.cutAt > 0 && c.ops >= c.cutAt {
		c.dead = true
	}
	if c.dead {
		return &os.PathError{Op: string(op), Path: name, Err: syscall.EIO}
	}
	base := filepath.Base(name)
	for _, f := range c.faults {
		if f.Op != op || (f.Name != "" && f.Name != base) {
			continue
		}
		f.seen++
		if f.seen <= f.Skip || (f.Count > 0 && f.failed >= f.Count) {
			continue
		}
		f.failed++
		return &os.PathError{Op: string(op), Path: name, Err: f.Err}
	}
	return nil
}

// CutOptions shape what a power cut keeps of unsynced writes.
type CutOptions struct {
	// KeepProb is the probability that each unsynced operation reaches
	// the disk anyway (0: all are dropped). Kept operations are applied
	// in order; a dropped one is simply missing (disks reorder).
	KeepProb float64
	// Tear keeps only a prefix, cut at a random 512-byte boundary, of the
	// last unsynced write of each file (when it is kept).
	Tear bool
	Rand *rand.Rand
}

// PowerCut kills this file system (every later operation on it or its
// open files fails with EIO) and returns what a reboot finds.
func (c *CrashFS) PowerCut(o CutOptions) *CrashFS {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dead = true
	r := o.Rand
	if r == nil {
		r = rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	}
	n := NewCrashFS()
	for d := range c.dirs {
		n.dirs[d] = true
	}
	// A directory removed (RemoveAll) without a durable removal comes
	// back with its durable entries.
	for name := range c.dnames {
		for d := filepath.Dir(name); !n.dirs[d]; d = filepath.Dir(d) {
			n.dirs[d] = true
		}
	}
	done := map[*inode]*inode{}
	for name, ino := range c.dnames {
		if ni, ok := done[ino]; ok {
			n.names[name], n.dnames[name] = ni, ni
			continue
		}
		data := append([]byte(nil), ino.dur...)
		lastWrite := -1
		for i, p := range ino.pending {
			if p.kind == OpWrite {
				lastWrite = i
			}
		}
		for i, p := range ino.pending {
			if o.KeepProb <= 0 || r.Float64() >= o.KeepProb {
				continue
			}
			if i == lastWrite && o.Tear && len(p.data) > 0 {
				sectors := (len(p.data) + 511) / 512
				keep := r.IntN(sectors) * 512 // strictly less than all
				p.data = p.data[:keep]
			}
			data = apply(data, p)
		}
		ni := &inode{cur: data, dur: append([]byte(nil), data...)}
		done[ino] = ni
		n.names[name], n.dnames[name] = ni, ni
	}
	return n
}

func apply(data []byte, p pendingOp) []byte {
	switch p.kind {
	case OpWrite:
		end := p.off + int64(len(p.data))
		if end > int64(len(data)) {
			data = grow(data, end)
		}
		copy(data[p.off:], p.data)
	case OpPunch:
		end := min(p.off+p.n, int64(len(data)))
		if p.off < end {
			clear(data[p.off:end])
		}
	case OpTruncate:
		if p.n <= int64(len(data)) {
			data = data[:p.n]
		} else {
			data = grow(data, p.n)
		}
	case OpAllocate:
		if end := p.off + p.n; end > int64(len(data)) {
			data = grow(data, end)
		}
	}
	return data
}

func grow(b []byte, n int64) []byte {
	if int64(cap(b)) >= n {
		old := len(b)
		b = b[:n]
		clear(b[old:])
		return b
	}
	nb := make([]byte, n, n+n/4)
	copy(nb, b)
	return nb
}

func (c *CrashFS) clean(name string) string { return filepath.Clean(name) }

func (c *CrashFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	name = c.clean(name)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.check(OpOpen, name); err != nil {
		return nil, err
	}
	if !c.dirs[filepath.Dir(name)] {
		return nil, &os.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	ino, ok := c.names[name]
	switch {
	case ok && flag&os.O_CREATE != 0 && flag&os.O_EXCL != 0:
		return nil, &os.PathError{Op: "open", Path: name, Err: fs.ErrExist}
	case !ok && flag&os.O_CREATE == 0:
		return nil, &os.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	case !ok:
		ino = &inode{}
		c.names[name] = ino
	}
	if flag&os.O_TRUNC != 0 {
		ino.cur = ino.cur[:0]
		ino.pending = append(ino.pending, pendingOp{kind: OpTruncate})
	}
	return &crashFile{fs: c, ino: ino, name: name}, nil
}

func (c *CrashFS) Remove(name string) error {
	name = c.clean(name)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.check(OpRemove, name); err != nil {
		return err
	}
	if _, ok := c.names[name]; !ok {
		if c.dirs[name] {
			delete(c.dirs, name)
			return nil
		}
		return &os.PathError{Op: "remove", Path: name, Err: fs.ErrNotExist}
	}
	delete(c.names, name)
	return nil
}

// RemoveAll removes path and every file and directory below it.
func (c *CrashFS) RemoveAll(path string) error {
	path = c.clean(path)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.check(OpRemove, path); err != nil {
		return err
	}
	under := func(n string) bool { return n == path || strings.HasPrefix(n, path+"/") || path == "/" }
	for n := range c.names {
		if under(n) {
			delete(c.names, n)
		}
	}
	for d := range c.dirs {
		if under(d) && d != "/" {
			delete(c.dirs, d)
		}
	}
	return nil
}

func (c *CrashFS) Rename(oldname, newname string) error {
	oldname, newname = c.clean(oldname), c.clean(newname)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.check(OpRename, oldname); err != nil {
		return err
	}
	ino, ok := c.names[oldname]
	if !ok {
		return &os.PathError{Op: "rename", Path: oldname, Err: fs.ErrNotExist}
	}
	delete(c.names, oldname)
	c.names[newname] = ino
	return nil
}

func (c *CrashFS) MkdirAll(dir string, perm os.FileMode) error {
	dir = c.clean(dir)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead {
		return &os.PathError{Op: "mkdir", Path: dir, Err: syscall.EIO}
	}
	for d := dir; ; d = filepath.Dir(d) {
		c.dirs[d] = true
		if d == "/" || d == "." {
			break
		}
	}
	return nil
}

type fileInfo struct {
	name string
	size int64
	dir  bool
}

func (f fileInfo) Name() string { return f.name }
func (f fileInfo) Size() int64  { return f.size }
func (f fileInfo) Mode() fs.FileMode {
	if f.dir {
		return fs.ModeDir | 0o755
	}
	return 0o644
}
func (f fileInfo) ModTime() time.Time { return time.Time{} }
func (f fileInfo) IsDir() bool        { return f.dir }
func (f fileInfo) Sys() any           { return nil }

func (c *CrashFS) Stat(name string) (os.FileInfo, error) {
	name = c.clean(name)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead {
		return nil, &os.PathError{Op: "stat", Path: name, Err: syscall.EIO}
	}
	if ino, ok := c.names[name]; ok {
		return fileInfo{name: filepath.Base(name), size: int64(len(ino.cur))}, nil
	}
	if c.dirs[name] {
		return fileInfo{name: filepath.Base(name), dir: true}, nil
	}
	return nil, &os.PathError{Op: "stat", Path: name, Err: fs.ErrNotExist}
}

// SyncDir makes the entries of dir durable as they are now.
func (c *CrashFS) SyncDir(dir string) error {
	dir = c.clean(dir)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.check(OpSyncDir, dir); err != nil {
		return err
	}
	for name := range c.dnames {
		// An entry of dir, or one below a subdirectory of dir that no
		// longer exists (removed with RemoveAll): the removal of that
		// subdirectory's entry makes its whole tree unreachable.
		if p := filepath.Dir(name); p == dir || (isBelow(name, dir) && !c.dirs[p]) {
			delete(c.dnames, name)
		}
	}
	for name, ino := range c.names {
		if filepath.Dir(name) == dir {
			c.dnames[name] = ino
		}
	}
	return nil
}

func isBelow(name, dir string) bool {
	return dir == "/" || strings.HasPrefix(name, dir+"/")
}

// Files lists the current file names (for tests).
func (c *CrashFS) Files() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for n := range c.names {
		out = append(out, n)
	}
	return out
}

type crashFile struct {
	fs     *CrashFS
	ino    *inode
	name   string
	closed bool
}

func (f *crashFile) op(op Op) error {
	if f.closed {
		return &os.PathError{Op: string(op), Path: f.name, Err: fs.ErrClosed}
	}
	return f.fs.check(op, f.name)
}

func (f *crashFile) ReadAt(p []byte, off int64) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.op(OpRead); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, &os.PathError{Op: "read", Path: f.name, Err: syscall.EINVAL}
	}
	if off >= int64(len(f.ino.cur)) {
		return 0, io.EOF
	}
	n := copy(p, f.ino.cur[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *crashFile) WriteAt(p []byte, off int64) (int, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.op(OpWrite); err != nil {
		return 0, err
	}
	if off < 0 {
		return 0, &os.PathError{Op: "write", Path: f.name, Err: syscall.EINVAL}
	}
	w := pendingOp{kind: OpWrite, off: off, data: append([]byte(nil), p...)}
	f.ino.cur = apply(f.ino.cur, w)
	f.ino.pending = append(f.ino.pending, w)
	return len(p), nil
}

func (f *crashFile) Close() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if f.closed {
		return &os.PathError{Op: "close", Path: f.name, Err: fs.ErrClosed}
	}
	f.closed = true
	return nil
}

func (f *crashFile) Sync() error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.op(OpSync); err != nil {
		return err
	}
	for _, p := range f.ino.pending {
		f.ino.dur = apply(f.ino.dur, p)
	}
	f.ino.pending = f.ino.pending[:0]
	return nil
}

func (f *crashFile) Truncate(size int64) error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.op(OpTruncate); err != nil {
		return err
	}
	p := pendingOp{kind: OpTruncate, n: size}
	f.ino.cur = apply(f.ino.cur, p)
	f.ino.pending = append(f.ino.pending, p)
	return nil
}

func (f *crashFile) Stat() (os.FileInfo, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if f.fs.dead {
		return nil, &os.PathError{Op: "stat", Path: f.name, Err: syscall.EIO}
	}
	return fileInfo{name: filepath.Base(f.name), size: int64(len(f.ino.cur))}, nil
}

func (f *crashFile) PunchHole(off, length int64) error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.op(OpPunch); err != nil {
		return err
	}
	p := pendingOp{kind: OpPunch, off: off, n: length}
	f.ino.cur = apply(f.ino.cur, p)
	f.ino.pending = append(f.ino.pending, p)
	return nil
}

func (f *crashFile) Allocate(off, length int64) error {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.op(OpAllocate); err != nil {
		return err
	}
	p := pendingOp{kind: OpAllocate, off: off, n: length}
	f.ino.cur = apply(f.ino.cur, p)
	f.ino.pending = append(f.ino.pending, p)
	return nil
}

// Allocated reports 4 KiB pages holding any non-zero byte as allocated
// (the in-memory file has no real allocation map).
func (f *crashFile) Allocated(off, length int64) ([]Range, error) {
	f.fs.mu.Lock()
	defer f.fs.mu.Unlock()
	if err := f.op(OpRead); err != nil {
		return nil, err
	}
	const pg = 4096
	var out []Range
	end := min(off+length, int64(len(f.ino.cur)))
	for p := off &^ (pg - 1); p < end; p += pg {
		pe := min(p+pg, int64(len(f.ino.cur)))
		if !isZero(f.ino.cur[p:pe]) {
			s, e := max(p, off), min(pe, end)
			if n := len(out); n > 0 && out[n-1].Off+out[n-1].Len == s {
				out[n-1].Len += e - s
			} else {
				out = append(out, Range{Off: s, Len: e - s})
			}
		}
	}
	return out, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// String describes the file system (for test failure messages).
func (c *CrashFS) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var b strings.Builder
	for n, ino := range c.names {
		fmt.Fprintf(&b, "%s: %d bytes, %d unsynced ops\n", n, len(ino.cur), len(ino.pending))
	}
	return b.String()
}
