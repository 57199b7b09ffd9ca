package server

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/replication"
)

// hosted is one volume on this server. Its role, epoch, lease and
// replication live in the replication.Host; hosted keeps what only the
// server knows: where the files are and what the master said about it.
type hosted struct {
	name string
	dir  string
	vol  *blockvol.Volume
	host *replication.Host

	mu      sync.Mutex
	id      uint64           // the master's incarnation ID of the volume
	primary api.ServerRef    // the volume's primary, as last assigned
	allow   []api.AllowEntry // NBD allow list, as last assigned (access.go)
	expand  expandState      // a failed prepare (expand.go)
}

func validVolumeName(name string) error {
	if name == "" || len(name) > 128 || name == "." || name == ".." ||
		strings.ContainsAny(name, "/\\\x00") {
		return fmt.Errorf("invalid volume name %q", name)
	}
	return nil
}

// openExisting opens every volume directory left by an earlier run. Each
// starts with no role until the master's next assignment: a restarted
// server never writes on the strength of a role it had before.
func (s *Server) openExisting() error {
	ents, err := os.ReadDir(s.volumesDir())
	if err != nil {
		return fmt.Errorf("server: list volumes: %w", err)
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		dir := filepath.Join(s.volumesDir(), e.Name())
		if !blockvol.ExistsOn(s.cfg.FS, dir) {
			continue
		}
		vol, err := blockvol.Open(dir, blockvol.Options{FS: s.cfg.FS, Logger: s.log})
		if err != nil {
			return fmt.Errorf("server: open volume %s: %w", e.Name(), err)
		}
		if _, err := s.addVolume(e.Name(), dir, vol); err != nil {
			return err
		}
		if err := s.recoverImport(e.Name(), dir, vol, false, vol.Flush); err != nil {
			s.log.Error("import_recovery_failed", "volume", e.Name(), "err", err)
		}
		s.log.Info("volume_opened", "volume", e.Name(), "epoch", vol.Epoch(), "stored_role", vol.Role(),
			"head_lsn", vol.HeadLSN(), "checkpoint_lsn", vol.CheckpointLSN())
	}
	return nil
}

func (s *Server) addVolume(name, dir string, vol *blockvol.Volume) (*hosted, error) {
	if err := s.host.AddVolume(name, vol); err != nil {
		_ = vol.Close()
		return nil, err
	}
	h := &hosted{name: name, dir: dir, vol: vol, host: s.host}
	s.mu.Lock()
	s.vols[name] = h
	s.mu.Unlock()
	return h, nil
}

// ensureVolume returns the hosted volume for an assignment, creating its
// files on first assignment.
func (s *Server) ensureVolume(a api.VolumeAssignment) (*hosted, error) {
	s.mu.Lock()
	h := s.vols[a.Volume]
	s.mu.Unlock()
	if h != nil {
		return h, nil
	}
	if err := validVolumeName(a.Volume); err != nil {
		return nil, err
	}
	dir := filepath.Join(s.volumesDir(), a.Volume)
	opts := blockvol.Options{Size: a.SizeBytes, BlockSize: a.BlockSize, WALSize: a.WALSizeBytes,
		FS: s.cfg.FS, Logger: s.log, DirectIO: s.cfg.DirectIO}
	var vol *blockvol.Volume
	var err error
	if blockvol.ExistsOn(s.cfg.FS, dir) {
		vol, err = blockvol.Open(dir, opts)
	} else {
		vol, err = blockvol.Create(dir, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", a.Volume, err)
	}
	s.log.Info("volume_created", "volume", a.Volume, "size", a.SizeBytes, "wal_size", vol.WALSize())
	return s.addVolume(a.Volume, dir, vol)
}

func (h *hosted) notPrimary(p api.ServerRef) error {
	if p.ServerID == "" {
		return fmt.Errorf("volume %s: this server is not its primary: %w", h.name, blockdev.ErrNotPrimary)
	}
	return fmt.Errorf("volume %s: this server is not its primary; primary is server %s at %s: %w",
		h.name, p.ServerID, p.NBDAddr, blockdev.ErrNotPrimary)
}

// device is what the frontends serve (the replication Primary, its writes
// gated by role, epoch and lease), or an error naming the primary.
func (h *hosted) device() (blockdev.Device, error) {
	if dev, ok := h.host.Device(h.name); ok {
		return dev, nil
	}
	h.mu.Lock()
	p := h.primary
	h.mu.Unlock()
	return nil, h.notPrimary(p)
}

func (h *hosted) close() error {
	if err := h.vol.Close(); err != nil && !errors.Is(err, blockdev.ErrClosed) {
		return fmt.Errorf("close volume %s: %w", h.name, err)
	}
	return nil
}
