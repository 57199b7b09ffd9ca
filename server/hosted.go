package server

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/replication"
)

// hosted is one volume on this server and what the master last told us
// about it.
type hosted struct {
	name string
	dir  string
	vol  *blockvol.Volume

	// leaseUntil (unix nanoseconds) is when this server's right to accept
	// writes as primary ends. It is measured from the moment the heartbeat
	// that earned it was SENT, so it always ends before the master's own
	// view of the lease does.
	leaseUntil atomic.Int64
	grace      time.Duration

	mu      sync.Mutex
	id      uint64 // the master's incarnation ID of the volume
	role    string // api.Role*
	primary api.ServerRef
	prim    *replication.Primary // set while primary
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
		if !blockvol.Exists(dir) {
			continue
		}
		vol, err := blockvol.Open(dir, blockvol.Options{FS: s.cfg.FS, Logger: s.log})
		if err != nil {
			return fmt.Errorf("server: open volume %s: %w", e.Name(), err)
		}
		h := &hosted{name: e.Name(), dir: dir, vol: vol, role: api.RoleNone, grace: s.cfg.LeaseGrace}
		s.vols[h.name] = h
		s.log.Info("volume_opened", "volume", h.name, "epoch", vol.Epoch(), "stored_role", vol.Role(),
			"head_lsn", vol.HeadLSN(), "checkpoint_lsn", vol.CheckpointLSN())
	}
	return nil
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
		FS: s.cfg.FS, Logger: s.log}
	var vol *blockvol.Volume
	var err error
	if blockvol.Exists(dir) {
		vol, err = blockvol.Open(dir, opts)
	} else {
		vol, err = blockvol.Create(dir, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", a.Volume, err)
	}
	h = &hosted{name: a.Volume, dir: dir, vol: vol, role: api.RoleNone, grace: s.cfg.LeaseGrace}
	s.mu.Lock()
	s.vols[a.Volume] = h
	s.mu.Unlock()
	s.log.Info("volume_created", "volume", a.Volume, "size", a.SizeBytes, "wal_size", a.WALSizeBytes)
	return h, nil
}

// gate is the primary's write gate: writes, trims and flushes pass only
// while this server is primary with an unexpired lease. When the lease has
// just run out it waits up to the grace period for a renewal, so a slow
// heartbeat stalls writes instead of failing them; it never lets a write
// through on an expired lease.
func (h *hosted) gate() error {
	deadline := time.Now().Add(h.grace)
	for {
		h.mu.Lock()
		role, primary := h.role, h.primary
		h.mu.Unlock()
		if role != api.RolePrimary {
			return h.notPrimary(primary)
		}
		now := time.Now()
		if now.UnixNano() < h.leaseUntil.Load() {
			return nil
		}
		if now.After(deadline) {
			return fmt.Errorf("volume %s: lease expired: %w", h.name, blockdev.ErrNotPrimary)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (h *hosted) notPrimary(p api.ServerRef) error {
	if p.ServerID == "" {
		return fmt.Errorf("volume %s: this server is not its primary: %w", h.name, blockdev.ErrNotPrimary)
	}
	return fmt.Errorf("volume %s: this server is not its primary; primary is server %s at %s: %w",
		h.name, p.ServerID, p.NBDAddr, blockdev.ErrNotPrimary)
}

// device is what the NBD frontend serves, or an error naming the primary.
func (h *hosted) device() (blockdev.Device, error) {
	h.mu.Lock()
	role, prim, p := h.role, h.prim, h.primary
	h.mu.Unlock()
	if role != api.RolePrimary || prim == nil {
		return nil, h.notPrimary(p)
	}
	return prim, nil
}

// stopPrimary ends the primary role's replication; the volume stays open.
func (h *hosted) stopPrimary() {
	h.mu.Lock()
	prim := h.prim
	h.prim = nil
	h.mu.Unlock()
	if prim != nil {
		_ = prim.Close()
	}
}

func (h *hosted) close() error {
	h.stopPrimary()
	if err := h.vol.Close(); err != nil && !errors.Is(err, blockdev.ErrClosed) {
		return fmt.Errorf("close volume %s: %w", h.name, err)
	}
	return nil
}
