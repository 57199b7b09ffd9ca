package replication

import (
	"fmt"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
)

// Roles of a volume on a server (persisted with the epoch by blockvol).
const (
	RolePrimary    = "primary"
	RoleReplica    = "replica"
	RoleRebuilding = "rebuilding"
	RoleNone       = "none"
)

// Assignment is the master's decision for one volume on this server: the
// one interface through which roles, epochs, leases and replica sets
// reach replication. The server passes every heartbeat reply's
// assignments to Host.Apply; tests call it directly.
type Assignment struct {
	Volume string
	Role   string // RolePrimary, RoleReplica, RoleRebuilding, RoleNone
	Epoch  uint64
	// LeaseUntil: a primary accepts writes only before it (renewed by
	// re-applying the same assignment with a later time).
	LeaseUntil time.Time
	Durability Durability
	Replicas   []Peer // primary only; identity is Peer.ServerID
	// PrimaryID is the server the master names as the volume's primary at
	// this epoch. A replica accepts a replication session only from it.
	PrimaryID string
	// ActingSet (primary only) lists the IDs of the Replicas that count for
	// sync_all, sync_quorum and MinCopies at this epoch. The primary ships
	// to every replica but counts only these, and never changes the set on
	// its own: only a new assignment does.
	ActingSet []string
	// MinCopies is the floor of durable copies, the primary's included,
	// below which a flush fails (0 = 1).
	MinCopies int
}

// HostConfig configures a Host.
type HostConfig struct {
	ServerID string // this server's stable ID
	Logger   *slog.Logger
	// Now is the clock for leases (default time.Now).
	Now func() time.Time
	// Primary is a template for every Primary this host creates (tuning:
	// RegionSize, CatchUp, Retention, Dial, PingInterval, DeadAfter...);
	// Volume, Epoch, Durability, Replicas, WriteGate and Logger are set
	// by the host.
	Primary PrimaryConfig
}

// Host runs replication for every volume of one volume server: one
// Receiver on one listener for its replica volumes, one Primary per
// volume it is primary for, and the role/epoch/lease gate.
type Host struct {
	cfg  HostConfig
	log  *slog.Logger
	recv *Receiver

	mu   sync.Mutex
	vols map[string]*hostVol
}

type hostVol struct {
	vol     *blockvol.Volume
	role    string
	epoch   uint64
	lease   time.Time
	primary *Primary
}

// VolumeStatus is what a heartbeat reports for one volume.
type VolumeStatus struct {
	Volume        string
	Role          string
	Epoch         uint64
	LeaseUntil    time.Time
	HeadLSN       uint64
	CheckpointLSN uint64
	DurableLSN    uint64
	Replicas      []ReplicaStatus // primary only
}

// NewHost makes a host; call Serve with the replication listener.
func NewHost(cfg HostConfig) *Host {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	h := &Host{cfg: cfg, log: cfg.Logger.With("server", cfg.ServerID), vols: map[string]*hostVol{}}
	h.recv = NewReceiver(ReceiverConfig{ServerID: cfg.ServerID, Lookup: h.lookup, Logger: cfg.Logger})
	return h
}

// Serve accepts primaries on ln (one listener for all replica volumes).
func (h *Host) Serve(ln net.Listener) error { return h.recv.Serve(ln) }

// AddVolume registers an open volume under its name. Its persisted epoch
// and role are the starting point; until an assignment arrives it serves
// neither writes nor replication (a persisted "primary" role without a
// lease is not a lease).
func (h *Host) AddVolume(name string, vol *blockvol.Volume) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.vols[name]; ok {
		return fmt.Errorf("replication: volume %s already added", name)
	}
	h.vols[name] = &hostVol{vol: vol, role: RoleNone, epoch: vol.Epoch()}
	return nil
}

// RemoveVolume stops replication for the volume (its Primary, if any, is
// closed). The volume itself is not closed.
func (h *Host) RemoveVolume(name string) error {
	h.mu.Lock()
	hv := h.vols[name]
	delete(h.vols, name)
	h.mu.Unlock()
	if hv == nil {
		return fmt.Errorf("replication: volume %s not found", name)
	}
	if hv.primary != nil {
		hv.primary.Close()
	}
	return nil
}

// Apply carries out an assignment. The epoch is persisted (fsync) before
// the role changes; a stale epoch is refused; a primary is created,
// updated (epoch, durability, replica set, lease) or demoted.
func (h *Host) Apply(a Assignment) error {
	h.mu.Lock()
	hv := h.vols[a.Volume]
	if hv == nil {
		h.mu.Unlock()
		return fmt.Errorf("replication: assignment for unknown volume %s", a.Volume)
	}
	if a.Epoch < hv.vol.Epoch() || a.Epoch < hv.epoch {
		cur := max(hv.vol.Epoch(), hv.epoch)
		h.mu.Unlock()
		h.log.Warn(EvRefused, "volume", a.Volume, "reason", "stale_assignment", "epoch", a.Epoch, "current", cur)
		return fmt.Errorf("replication: assignment for %s: %w: epoch %d below %d", a.Volume, ErrStaleEpoch, a.Epoch, cur)
	}
	switch a.Role {
	case RolePrimary, RoleReplica, RoleRebuilding, RoleNone:
	default:
		h.mu.Unlock()
		return fmt.Errorf("replication: assignment for %s: unknown role %q", a.Volume, a.Role)
	}
	// Fence first: from here on the old role's authority is gone.
	var demote *Primary
	if a.Role != RolePrimary && hv.primary != nil {
		demote, hv.primary = hv.primary, nil
	}
	if hv.role != a.Role || hv.epoch != a.Epoch {
		h.log.Info("assignment", "volume", a.Volume, "role", a.Role, "epoch", a.Epoch, "old_role", hv.role, "old_epoch", hv.epoch)
	}
	hv.role, hv.epoch, hv.lease = a.Role, a.Epoch, a.LeaseUntil
	vol, prim := hv.vol, hv.primary
	h.mu.Unlock()
	if demote != nil {
		demote.Close()
	}
	if vol.Epoch() != a.Epoch || vol.Role() != a.Role {
		if err := vol.SetEpochRole(a.Epoch, a.Role); err != nil {
			return fmt.Errorf("replication: persist epoch %d role %s for %s: %w", a.Epoch, a.Role, a.Volume, err)
		}
	}
	if a.Role != RolePrimary {
		return nil
	}
	if prim != nil {
		return prim.Update(a)
	}
	cfg := h.cfg.Primary
	cfg.Volume, cfg.ServerID, cfg.Epoch, cfg.Durability, cfg.Replicas = a.Volume, h.cfg.ServerID, a.Epoch, a.Durability, a.Replicas
	cfg.ActingSet, cfg.MinCopies = a.ActingSet, a.MinCopies
	cfg.Logger = h.cfg.Logger
	name := a.Volume
	cfg.WriteGate = func() error { return h.gate(name) }
	p, err := NewPrimary(vol, cfg)
	if err != nil {
		return err
	}
	h.mu.Lock()
	if cur := h.vols[name]; cur != hv || hv.role != RolePrimary || hv.primary != nil {
		h.mu.Unlock()
		p.Close()
		return fmt.Errorf("replication: assignment for %s changed while starting the primary", name)
	}
	hv.primary = p
	h.mu.Unlock()
	return nil
}

// gate: writes need the primary role, the primary's epoch and a lease.
func (h *Host) gate(name string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	hv := h.vols[name]
	switch {
	case hv == nil:
		return fmt.Errorf("%w: volume %s not hosted", blockdev.ErrNotPrimary, name)
	case hv.role != RolePrimary:
		return fmt.Errorf("%w: volume %s role is %s", blockdev.ErrNotPrimary, name, hv.role)
	case !h.cfg.Now().Before(hv.lease):
		return fmt.Errorf("%w: volume %s lease expired at %s (epoch %d)", blockdev.ErrNotPrimary, name, hv.lease.Format(time.RFC3339Nano), hv.epoch)
	}
	return nil
}

func (h *Host) lookup(name string) (ReplicaTarget, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	hv := h.vols[name]
	if hv == nil || (hv.role != RoleReplica && hv.role != RoleRebuilding) {
		return ReplicaTarget{}, false
	}
	return ReplicaTarget{Vol: hv.vol, Epoch: hv.epoch}, true
}

// Device is what the frontends export for a volume: the Primary (writes
// gated by role, epoch and lease) while this server is its primary.
func (h *Host) Device(name string) (blockdev.Device, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if hv := h.vols[name]; hv != nil && hv.primary != nil {
		return hv.primary, true
	}
	return nil, false
}

// Primary returns the volume's Primary while this server is its primary.
func (h *Host) Primary(name string) (*Primary, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if hv := h.vols[name]; hv != nil && hv.primary != nil {
		return hv.primary, true
	}
	return nil, false
}

// Status reports every hosted volume (for the heartbeat), sorted by name.
func (h *Host) Status() []VolumeStatus {
	h.mu.Lock()
	type pair struct {
		name string
		hv   hostVol
	}
	var list []pair
	for n, hv := range h.vols {
		list = append(list, pair{n, *hv})
	}
	h.mu.Unlock()
	sort.Slice(list, func(i, j int) bool { return list[i].name < list[j].name })
	out := make([]VolumeStatus, 0, len(list))
	for _, x := range list {
		st := VolumeStatus{Volume: x.name, Role: x.hv.role, Epoch: x.hv.epoch, LeaseUntil: x.hv.lease,
			HeadLSN: x.hv.vol.HeadLSN(), CheckpointLSN: x.hv.vol.CheckpointLSN(), DurableLSN: x.hv.vol.DurableLSN()}
		if x.hv.primary != nil {
			st.Replicas = x.hv.primary.Replicas()
		}
		out = append(out, st)
	}
	return out
}

// Close stops the receiver and every primary. Volumes stay open.
func (h *Host) Close() error {
	h.recv.Close()
	h.mu.Lock()
	var ps []*Primary
	for _, hv := range h.vols {
		if hv.primary != nil {
			ps = append(ps, hv.primary)
			hv.primary = nil
		}
	}
	h.mu.Unlock()
	for _, p := range ps {
		p.Close()
	}
	return nil
}
