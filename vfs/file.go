package vfs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
)

// tmpSeq makes the temporary names of concurrent WriteFileAtomic calls
// distinct within a process (the pid distinguishes processes).
var tmpSeq atomic.Uint64

// WriteFileAtomic replaces path with data durably: data goes to a new
// temporary file in path's directory, which is fsynced, renamed over path,
// and then the directory is fsynced. Whatever operation a power cut
// interrupts, path afterwards holds either its previous content (or is
// still absent) or data: never a prefix, a mix or an empty file. When it
// returns nil, data is durable.
//
// Concurrent calls for one path do not corrupt it; the last rename wins,
// so callers that need an order serialise their calls. A temporary file
// (path.tmp.*) can be left behind by a crash; it is never read.
func WriteFileAtomic(fsys FS, path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	var tmp string
	var f File
	for {
		tmp = path + ".tmp." + strconv.Itoa(os.Getpid()) + "." + strconv.FormatUint(tmpSeq.Add(1), 10)
		var err error
		f, err = fsys.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
		if errors.Is(err, os.ErrExist) {
			continue // left by an earlier process with the same pid
		}
		if err != nil {
			return fmt.Errorf("vfs: write %s: create temporary file: %w", path, err)
		}
		break
	}
	fail := func(step string, err error) error {
		_ = fsys.Remove(tmp)
		return fmt.Errorf("vfs: write %s: %s: %w", path, step, err)
	}
	if _, err := f.WriteAt(data, 0); err != nil {
		f.Close()
		return fail("write", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fail("fsync", err)
	}
	if err := f.Close(); err != nil {
		return fail("close", err)
	}
	if err := fsys.Rename(tmp, path); err != nil {
		return fail("rename", err)
	}
	if err := fsys.SyncDir(dir); err != nil {
		return fmt.Errorf("vfs: write %s: %w", path, err)
	}
	return nil
}

// ReadFile returns the whole content of name.
func ReadFile(fsys FS, name string) ([]byte, error) {
	f, err := fsys.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	b := make([]byte, st.Size())
	n, err := f.ReadAt(b, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b[:n], nil
}
