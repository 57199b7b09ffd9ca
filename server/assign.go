package server

import (
	"fmt"
	"os"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
)

// step is what applying one assignment does to a hosted volume. Choosing
// the step is a pure function of the local facts and the assignment
// (decide), so the rules are tested without sockets or disks.
type step int

const (
	stepIgnoreStale   step = iota // assignment's epoch is older than the volume's
	stepBecomePrimary             // new primary role or epoch: persist, start replication
	stepRenewPrimary              // same role and epoch: renew lease, refresh replica set
	stepBecomeReplica             // new replica role or epoch: persist, stop primary work
	stepKeepReplica               // nothing changes
	stepStop                      // role none: stop serving, keep data
	stepRefuseInvalid             // assignment is malformed
)

func (s step) String() string {
	return [...]string{"ignore_stale", "become_primary", "renew_primary", "become_replica",
		"keep_replica", "stop", "refuse_invalid"}[s]
}

// localFacts is what decide needs to know about the hosted volume.
type localFacts struct {
	hosted bool
	role   string
	epoch  uint64 // persisted epoch of the volume
}

func decide(l localFacts, a api.VolumeAssignment) step {
	if a.Epoch == 0 && a.Role != api.RoleNone {
		return stepRefuseInvalid
	}
	if l.hosted && a.Epoch < l.epoch {
		return stepIgnoreStale
	}
	switch a.Role {
	case api.RolePrimary:
		if l.hosted && l.role == api.RolePrimary && a.Epoch == l.epoch {
			return stepRenewPrimary
		}
		return stepBecomePrimary
	case api.RoleReplica, api.RoleRebuilding:
		if l.hosted && l.role == api.RoleReplica && a.Epoch == l.epoch {
			return stepKeepReplica
		}
		return stepBecomeReplica
	case api.RoleNone:
		return stepStop
	}
	return stepRefuseInvalid
}

// apply carries out one heartbeat reply. sent is when the heartbeat was
// sent: leases count from then.
func (s *Server) apply(resp *api.HeartbeatResponse, sent time.Time) {
	for _, a := range resp.Assignments {
		if err := s.applyOne(a, sent); err != nil {
			s.log.Error("assignment_failed", "volume", a.Volume, "role", a.Role, "epoch", a.Epoch, "err", err)
		}
	}
	for _, name := range resp.Drop {
		s.drop(name)
	}
}

func (s *Server) applyOne(a api.VolumeAssignment, sent time.Time) error {
	s.mu.Lock()
	h := s.vols[a.Volume]
	s.mu.Unlock()
	facts := localFacts{}
	if h != nil {
		h.mu.Lock()
		facts = localFacts{hosted: true, role: h.role, epoch: h.vol.Epoch()}
		h.mu.Unlock()
	}
	st := decide(facts, a)
	if st != stepRenewPrimary && st != stepKeepReplica {
		s.log.Info("assignment", "volume", a.Volume, "step", st.String(), "role", a.Role,
			"epoch", a.Epoch, "local_role", facts.role, "local_epoch", facts.epoch)
	}
	switch st {
	case stepIgnoreStale, stepKeepReplica:
		if h != nil {
			h.mu.Lock()
			h.primary, h.id = a.Primary, a.ID
			h.mu.Unlock()
		}
		return nil
	case stepRefuseInvalid:
		return fmt.Errorf("invalid assignment (role %q, epoch %d)", a.Role, a.Epoch)
	case stepStop:
		if h != nil {
			s.demote(h, api.RoleNone, a)
		}
		return nil
	}
	h, err := s.ensureVolume(a)
	if err != nil {
		return err
	}
	mode, err := replication.ParseDurability(a.Durability)
	if err != nil {
		return err
	}
	peers := make([]replication.Peer, 0, len(a.Replicas))
	for _, r := range a.Replicas {
		// A replica is named by its server ID; without one it fails closed.
		if r.ServerID == "" {
			s.log.Error("replica_without_id_skipped", "volume", a.Volume, "addr", r.Addr)
			continue
		}
		peers = append(peers, replication.Peer{ServerID: r.ServerID, Addr: r.Addr})
	}

	switch st {
	case stepBecomeReplica:
		s.demote(h, api.RoleReplica, a)
		// The epoch is persisted (fsync) before the role is taken, so a
		// primary of an older epoch is refused from the first message.
		if err := h.vol.SetEpochRole(a.Epoch, api.RoleReplica); err != nil {
			return fmt.Errorf("persist epoch: %w", err)
		}
		h.mu.Lock()
		h.role, h.primary, h.id = api.RoleReplica, a.Primary, a.ID
		h.mu.Unlock()
		return nil

	case stepBecomePrimary:
		if err := h.vol.SetEpochRole(a.Epoch, api.RolePrimary); err != nil {
			return fmt.Errorf("persist epoch: %w", err)
		}
		h.mu.Lock()
		prim := h.prim
		h.mu.Unlock()
		if prim == nil {
			prim, err = replication.NewPrimary(h.vol, replication.PrimaryConfig{
				Volume: a.Volume, ServerID: s.cfg.ServerID, Epoch: a.Epoch, Durability: mode,
				Replicas: peers, WriteGate: h.gate, Logger: s.log.With("volume", a.Volume),
				StateDir: h.dir, FS: s.cfg.FS,
			})
			if err != nil {
				return fmt.Errorf("start primary: %w", err)
			}
		} else if err := prim.Update(a.Epoch, mode, peers); err != nil {
			return fmt.Errorf("update primary: %w", err)
		}
		h.mu.Lock()
		h.role, h.primary, h.id, h.prim = api.RolePrimary, a.Primary, a.ID, prim
		h.mu.Unlock()
		h.renewLease(a, sent)
		return nil

	case stepRenewPrimary:
		h.mu.Lock()
		prim := h.prim
		h.primary, h.id = a.Primary, a.ID
		h.mu.Unlock()
		if prim != nil {
			if err := prim.Update(a.Epoch, mode, peers); err != nil {
				return fmt.Errorf("update primary: %w", err)
			}
		}
		h.renewLease(a, sent)
		return nil
	}
	return nil
}

// renewLease extends the write lease to sent+TTL. A TTL of 0 (a fresh
// promotion while the old primary's lease may still be live) grants none.
func (h *hosted) renewLease(a api.VolumeAssignment, sent time.Time) {
	if a.LeaseTTLMS <= 0 {
		return
	}
	until := sent.Add(time.Duration(a.LeaseTTLMS) * time.Millisecond).UnixNano()
	for {
		cur := h.leaseUntil.Load()
		if until <= cur || h.leaseUntil.CompareAndSwap(cur, until) {
			return
		}
	}
}

// demote takes the primary role away: the lease ends at once, open NBD
// connections to the volume are cut (clients reconnect to the new
// primary), and replication to the old replica set stops.
func (s *Server) demote(h *hosted, role string, a api.VolumeAssignment) {
	h.leaseUntil.Store(0)
	h.mu.Lock()
	was := h.role
	h.role, h.primary, h.id = role, a.Primary, a.ID
	h.mu.Unlock()
	if was == api.RolePrimary {
		h.stopPrimary()
		n := s.nbdSrv.DisconnectExport(h.name)
		s.log.Info("primary_demoted", "volume", h.name, "to", role, "epoch", a.Epoch, "nbd_conns_closed", n)
	}
}

// drop removes a deleted volume and its data.
func (s *Server) drop(name string) {
	s.mu.Lock()
	h := s.vols[name]
	delete(s.vols, name)
	s.mu.Unlock()
	if h == nil {
		return
	}
	s.demote(h, api.RoleNone, api.VolumeAssignment{Volume: name})
	if err := h.close(); err != nil {
		s.log.Error("volume_drop_close_failed", "volume", name, "err", err)
	}
	if err := os.RemoveAll(h.dir); err != nil {
		s.log.Error("volume_drop_failed", "volume", name, "err", err)
		return
	}
	s.log.Info("volume_dropped", "volume", name)
}
