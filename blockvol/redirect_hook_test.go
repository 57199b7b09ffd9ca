package blockvol

import (
	"os"
	"path/filepath"
	"sync"

	"github.com/blockd/blockd/vfs"
)

// hookFS wraps a CrashFS; onSync (if set) runs before a file's Sync with
// the file's base name, and may block.
type hookFS struct {
	*vfs.CrashFS
	mu     sync.Mutex
	onSync func(name string)
}

type hookFile struct {
	vfs.File
	fs   *hookFS
	name string
}

func (h *hookFS) OpenFile(name string, flag int, perm os.FileMode) (vfs.File, error) {
	f, err := h.CrashFS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &hookFile{File: f, fs: h, name: filepath.Base(name)}, nil
}

func (f *hookFile) Sync() error {
	f.fs.mu.Lock()
	fn := f.fs.onSync
	f.fs.mu.Unlock()
	if fn != nil {
		fn(f.name)
	}
	return f.File.Sync()
}

func (h *hookFS) set(fn func(string)) {
	h.mu.Lock()
	h.onSync = fn
	h.mu.Unlock()
}
