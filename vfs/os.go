package vfs

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

type osFS struct{}

func (osFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	f, err := os.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &osFile{f: f, fd: int(f.Fd())}, nil
}

func (osFS) Remove(name string) error                    { return os.Remove(name) }
func (osFS) RemoveAll(path string) error                 { return os.RemoveAll(path) }
func (osFS) Rename(oldname, newname string) error        { return os.Rename(oldname, newname) }
func (osFS) MkdirAll(dir string, perm os.FileMode) error { return os.MkdirAll(dir, perm) }
func (osFS) Stat(name string) (os.FileInfo, error)       { return os.Stat(name) }

func (osFS) SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("vfs: fsync dir %s: %w", dir, err)
	}
	return nil
}

// osFile reads and writes through *os.File (which keeps the descriptor
// alive while a call uses it, so a racing Close can never redirect a
// pread to a reused descriptor) and uses the raw descriptor for the calls
// os.File lacks (fdatasync, fallocate, lseek).
type osFile struct {
	f      *os.File
	fd     int
	direct direct // direct.go
}

func (o *osFile) ReadAt(p []byte, off int64) (int, error)  { return o.f.ReadAt(p, off) }
func (o *osFile) WriteAt(p []byte, off int64) (int, error) { return o.f.WriteAt(p, off) }

func (o *osFile) Close() error {
	err := o.f.Close()
	if derr := o.closeDirect(); err == nil {
		err = derr
	}
	return err
}

func (o *osFile) Sync() error {
	for {
		err := unix.Fdatasync(o.fd)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.PathError{Op: "fdatasync", Path: o.f.Name(), Err: err}
		}
		return nil
	}
}

func (o *osFile) Truncate(size int64) error  { return o.f.Truncate(size) }
func (o *osFile) Stat() (os.FileInfo, error) { return o.f.Stat() }

func (o *osFile) PunchHole(off, length int64) error {
	if length <= 0 {
		return nil
	}
	for {
		err := unix.Fallocate(o.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.PathError{Op: "fallocate(punch_hole)", Path: o.f.Name(), Err: err}
		}
		return nil
	}
}

func (o *osFile) Allocate(off, length int64) error {
	if length <= 0 {
		return nil
	}
	for {
		err := unix.Fallocate(o.fd, 0, off, length)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &os.PathError{Op: "fallocate", Path: o.f.Name(), Err: err}
		}
		return nil
	}
}

// Allocated walks the file with SEEK_DATA/SEEK_HOLE.
func (o *osFile) Allocated(off, length int64) ([]Range, error) {
	end := off + length
	var out []Range
	pos := off
	for pos < end {
		d, err := unix.Seek(o.fd, pos, unix.SEEK_DATA)
		if err == unix.ENXIO { // no data at or after pos
			break
		}
		if err != nil {
			return nil, &os.PathError{Op: "lseek(SEEK_DATA)", Path: o.f.Name(), Err: err}
		}
		if d >= end {
			break
		}
		h, err := unix.Seek(o.fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, &os.PathError{Op: "lseek(SEEK_HOLE)", Path: o.f.Name(), Err: err}
		}
		if h > end {
			h = end
		}
		out = append(out, Range{Off: d, Len: h - d})
		pos = h
	}
	return out, nil
}
