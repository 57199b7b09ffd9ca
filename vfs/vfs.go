// Package vfs is the one small file interface every disk operation of the
// volume engine goes through. Default is the real operating system; the
// crash implementation (NewCrashFS) keeps files in memory and can simulate a
// power cut, torn writes and injected errors, so crash consistency can be
// tested without root or real hardware.
package vfs

import (
	"io"
	"os"
)

// Range is an allocated byte range of a file.
type Range struct {
	Off, Len int64
}

// FS is a file system.
type FS interface {
	OpenFile(name string, flag int, perm os.FileMode) (File, error)
	Remove(name string) error
	// RemoveAll removes path and everything below it; a missing path is
	// not an error (as os.RemoveAll). SyncDir of the parent makes the
	// removal durable.
	RemoveAll(path string) error
	Rename(oldname, newname string) error
	MkdirAll(dir string, perm os.FileMode) error
	Stat(name string) (os.FileInfo, error)
	// SyncDir makes the directory entries of dir durable (fsync of the
	// directory, after a create, remove or rename).
	SyncDir(dir string) error
}

// File is an open file.
type File interface {
	io.ReaderAt
	io.WriterAt
	io.Closer
	// Sync makes the file's data durable (fdatasync).
	Sync() error
	Truncate(size int64) error
	Stat() (os.FileInfo, error)
	// PunchHole deallocates [off, off+length) keeping the file size;
	// reads of the range return zeroes afterwards.
	PunchHole(off, length int64) error
	// Allocated lists the allocated (data) ranges within [off, off+length),
	// sorted. Unallocated ranges read as zeroes.
	Allocated(off, length int64) ([]Range, error)
	// Allocate reserves disk space for [off, off+length) (fallocate mode 0),
	// extending the file if needed, so later writes there cannot fail with
	// ENOSPC.
	Allocate(off, length int64) error
}

// Default is the real operating system.
var Default FS = osFS{}
