package server

import (
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
)

// apply carries out one heartbeat reply. sent is when the heartbeat was
// sent: leases count from then, so this server's lease always ends before
// the master's view of it does.
//
// An error is logged once per distinct error and volume (the master
// repeats every assignment in every reply). A volume that cannot be
// created or opened is reported in the next heartbeats' Failures instead.
func (s *Server) apply(resp *api.HeartbeatResponse, sent time.Time) {
	s.peers.set(resp.Assignments)
	assigned := map[string]bool{}
	for _, a := range resp.Assignments {
		if a.Role != api.RoleNone {
			assigned[a.Volume] = true
		}
		err := s.applyOne(a, sent)
		var cf *createFailed
		switch {
		case errors.Is(err, errRetryLater) || errors.As(err, &cf):
			// reported in Failures and logged by ensureHosted
		case s.fails.noteErr(a.Volume, err):
			s.log.Error("assignment_failed", "volume", a.Volume, "role", a.Role, "epoch", a.Epoch, "err", err)
		}
	}
	s.fails.keepOnly(assigned)
	for _, name := range resp.Drop {
		s.drop(name)
	}
}

// ensureHosted is ensureVolume with failure reporting: a volume whose
// create or open fails is retried with a growing pause (failRetryMin to
// failRetryMax), reported to the master in every heartbeat until it
// succeeds or is no longer assigned, and logged once per distinct reason.
func (s *Server) ensureHosted(a api.VolumeAssignment) (*hosted, error) {
	s.mu.Lock()
	h, dropping := s.vols[a.Volume], s.dropping[a.Volume]
	s.mu.Unlock()
	if h != nil {
		return h, nil
	}
	if dropping {
		// A volume of this name was deleted and its files are still
		// being removed; the next heartbeat tries again.
		return nil, fmt.Errorf("volume %s: the deleted volume of this name is still being removed: %w", a.Volume, errRetryLater)
	}
	if !s.fails.due(a.Volume, a.ID) {
		return nil, fmt.Errorf("volume %s: %w", a.Volume, errRetryLater)
	}
	h, err := s.ensureVolume(a)
	if err != nil {
		if isNew, retry := s.fails.failed(a.Volume, a.ID, err.Error()); isNew {
			s.log.Error("volume_create_failed", "volume", a.Volume, "id", a.ID, "size", a.SizeBytes,
				"wal_size", a.WALSizeBytes, "reason", err.Error(), "retry_in", retry.String())
		}
		return nil, &createFailed{err}
	}
	s.fails.clear(a.Volume)
	return h, nil
}

// applyOne turns the master's assignment into the replication host's
// (which persists the epoch before the role, refuses stale epochs, starts
// or demotes the primary and gates writes on the lease) and does what
// only the server can: create or grow the volume's files and cut NBD
// clients off a demoted primary.
func (s *Server) applyOne(a api.VolumeAssignment, sent time.Time) error {
	if a.Role == api.RoleNone {
		s.mu.Lock()
		h := s.vols[a.Volume]
		s.mu.Unlock()
		if h == nil {
			return nil
		}
	}
	h, err := s.ensureHosted(a)
	if err != nil {
		return err
	}
	mode, err := replication.ParseDurability(a.Durability)
	if err != nil {
		return err
	}
	ra := replication.Assignment{Volume: a.Volume, Role: replication.Role(a.Role), Epoch: a.Epoch, Durability: mode,
		PrimaryID: a.Primary.ServerID, ActingSet: a.ActingSet, MinCopies: a.MinCopies}
	if a.LeaseTTLMS > 0 {
		ra.LeaseUntil = sent.Add(time.Duration(a.LeaseTTLMS) * time.Millisecond)
	}
	for _, r := range a.Replicas {
		// A replica is named by its server ID; without one it fails closed.
		if r.ServerID == "" {
			s.log.Error("replica_without_id_skipped", "volume", a.Volume, "addr", r.Addr)
			continue
		}
		ra.Replicas = append(ra.Replicas, replication.Peer{ServerID: r.ServerID, Addr: r.Addr})
	}
	h.mu.Lock()
	h.id, h.primary = a.ID, a.Primary
	h.mu.Unlock()
	h.setAllow(a.Allow)

	_, wasPrimary := s.host.Primary(a.Volume)
	if err := s.host.Apply(ra); err != nil {
		return err
	}
	s.fails.noteErr(a.Volume, nil)
	if wasPrimary && a.Role != api.RolePrimary {
		n := s.nbdSrv.DisconnectExport(a.Volume)
		s.log.Info("primary_demoted", "volume", a.Volume, "to", a.Role, "epoch", a.Epoch, "nbd_conns_closed", n)
	}
	if err := s.applyExpand(h, a); err != nil { // expand.go
		return err
	}
	return nil
}

// drop removes a deleted volume and its data. Only the part that stops
// serving it runs here; closing it (which waits for its I/O and its
// flusher) and removing its files run in the background, because drop is
// called from the heartbeat loop, and the heartbeats renew every other
// volume's lease: a drop under load held them back for seconds. Until
// the removal is done the name is in s.dropping, and an assignment of the
// same name waits for it (ensureHosted: errRetryLater).
func (s *Server) drop(name string) {
	s.fails.clear(name)
	s.mu.Lock()
	h := s.vols[name]
	delete(s.vols, name)
	if h != nil {
		if s.dropping == nil {
			s.dropping = map[string]bool{}
		}
		s.dropping[name] = true
	}
	s.mu.Unlock()
	if h == nil {
		return
	}
	if _, ok := s.host.Primary(name); ok {
		s.nbdSrv.DisconnectExport(name)
	}
	// Its role goes at once: nothing writes to a deleted volume.
	if err := s.host.RemoveVolume(name); err != nil {
		s.log.Error("volume_drop_failed", "volume", name, "err", err)
	}
	s.dropWG.Add(1)
	go func() {
		defer s.dropWG.Done()
		s.remove(name, h)
		s.mu.Lock()
		delete(s.dropping, name)
		s.mu.Unlock()
	}()
}

// remove closes a dropped volume and deletes its data (drop's background
// half).
func (s *Server) remove(name string, h *hosted) {
	if err := h.close(); err != nil {
		s.log.Error("volume_drop_close_failed", "volume", name, "err", err)
	}
	if s.met != nil {
		s.met.forget(name)
	}
	// Through the server's FS, and the parent synced, so a drop cannot come
	// back after a power cut as a half-removed volume directory.
	if err := s.cfg.FS.RemoveAll(h.dir); err != nil {
		s.log.Error("volume_drop_failed", "volume", name, "err", err)
		return
	}
	if err := s.cfg.FS.SyncDir(filepath.Dir(h.dir)); err != nil {
		s.log.Error("volume_drop_failed", "volume", name, "err", err)
		return
	}
	s.log.Info("volume_dropped", "volume", name)
}
