package replication

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
)

// Role is a volume's role on a server. The names are the wire's (api)
// and the superblock's (blockvol persists string(role)).
type Role string

// Roles of a volume on a server.
const (
	RolePrimary    Role = "primary"
	RoleReplica    Role = "replica"
	RoleRebuilding Role = "rebuilding"
	RoleNone       Role = "none"
)

// Valid reports whether r is one of the four roles.
func (r Role) Valid() bool {
	switch r {
	case RolePrimary, RoleReplica, RoleRebuilding, RoleNone:
		return true
	}
	return false
}

// Assignment is the master's decision for one volume on this server: the
// one interface through which roles, epochs, leases and replica sets
// reach replication. The server passes every heartbeat reply's
// assignments to Host.Apply; tests call it directly.
type Assignment struct {
	Volume string
	Role   Role
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
//
// Each volume has one authority record (role, epoch, lease, named
// primary, acting set, min copies), replaced whole through an
// atomic.Pointer. It changes in one place, setAuthorityLocked, which persists
// the epoch and role (fsync) before it publishes the new record: a failed
// persist leaves the old record in force, with its lease revoked. The
// write gate and the receiver read the record without a lock.
type Host struct {
	cfg  HostConfig
	log  *slog.Logger
	recv *Receiver

	mu     sync.Mutex                          // serialises changes to vols and to every hostVol.primary
	vols   atomic.Pointer[map[string]*hostVol] // copy on write: read without mu
	closed bool                                // guarded by mu
}

// authority is what this server holds for one volume: immutable once
// published.
type authority struct {
	Role      Role
	Epoch     uint64
	Lease     time.Time // writes only before it (primary)
	PrimaryID string    // the primary the master names at Epoch
	ActingSet []string
	MinCopies int
}

type hostVol struct {
	name string
	vol  *blockvol.Volume
	auth atomic.Pointer[authority]
	// amu serialises the volume's authority changes (Apply, a higher
	// epoch from the named primary, removal): persist, then publish.
	amu     sync.Mutex
	removed bool                    // guarded by amu
	primary atomic.Pointer[Primary] // read without a lock; set under Host.mu
}

// VolumeStatus is what a heartbeat reports for one volume.
type VolumeStatus struct {
	Volume        string
	Role          Role
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
	h := &Host{cfg: cfg, log: cfg.Logger.With("server", cfg.ServerID)}
	h.vols.Store(&map[string]*hostVol{})
	h.recv = NewReceiver(ReceiverConfig{ServerID: cfg.ServerID, Lookup: h.lookup, Advance: h.advance, Logger: cfg.Logger})
	return h
}

// Serve accepts primaries on ln (one listener for all replica volumes).
func (h *Host) Serve(ln net.Listener) error { return h.recv.Serve(ln) }

func (h *Host) get(name string) *hostVol { return (*h.vols.Load())[name] }

// AddVolume registers an open volume under its name. Its persisted epoch
// is the starting point; until an assignment arrives it serves neither
// writes nor replication (a persisted "primary" role without a lease is
// not a lease).
func (h *Host) AddVolume(name string, vol *blockvol.Volume) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	old := *h.vols.Load()
	if _, ok := old[name]; ok {
		return fmt.Errorf("replication: volume %s already added", name)
	}
	hv := &hostVol{name: name, vol: vol}
	hv.auth.Store(&authority{Role: RoleNone, Epoch: vol.Epoch()})
	next := make(map[string]*hostVol, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[name] = hv
	h.vols.Store(&next)
	return nil
}

// RemoveVolume stops replication for the volume (its Primary, if any, is
// closed). The volume itself is not closed.
func (h *Host) RemoveVolume(name string) error {
	hv := h.get(name)
	if hv == nil {
		return fmt.Errorf("replication: volume %s not found", name)
	}
	// amu first (as Apply): an Apply in progress finishes, and none
	// starts a Primary for this volume afterwards.
	hv.amu.Lock()
	if hv.removed {
		hv.amu.Unlock()
		return fmt.Errorf("replication: volume %s not found", name)
	}
	hv.removed = true
	cur := hv.auth.Load()
	hv.auth.Store(&authority{Role: RoleNone, Epoch: cur.Epoch})
	h.mu.Lock()
	old := *h.vols.Load()
	next := make(map[string]*hostVol, len(old))
	for k, v := range old {
		if k != name {
			next[k] = v
		}
	}
	h.vols.Store(&next)
	prim := hv.primary.Swap(nil)
	h.mu.Unlock()
	hv.amu.Unlock()
	if prim != nil {
		prim.Close()
	}
	// New sessions no longer find the volume (lookup); the receiver drops
	// the live one and its tail hold.
	h.recv.Forget(name)
	return nil
}

// setAuthorityLocked is the one place a volume's authority changes: the
// epoch and role are persisted (blockvol.SetEpochRole, fsync) first and
// the record is published only once they are on disk. If the persist
// fails, the old record stays with its lease revoked (no writes at an
// epoch or under a role that is not on disk), and the error names the
// cause. hv.amu is held.
func (h *Host) setAuthorityLocked(hv *hostVol, next authority) error {
	cur := hv.auth.Load()
	if next.Epoch < cur.Epoch || next.Epoch < hv.vol.Epoch() {
		c := max(cur.Epoch, hv.vol.Epoch())
		return fmt.Errorf("replication: volume %s: %w: epoch %d below %d", hv.name, ErrStaleEpoch, next.Epoch, c)
	}
	if hv.vol.Epoch() != next.Epoch || hv.vol.Role() != string(next.Role) {
		if err := hv.vol.SetEpochRole(next.Epoch, string(next.Role)); err != nil {
			fenced := *cur
			fenced.Lease = time.Time{}
			hv.auth.Store(&fenced)
			h.log.Error(EvAuthorityPersistFailed, "volume", hv.name, "role", string(next.Role), "epoch", next.Epoch,
				"kept_role", string(cur.Role), "kept_epoch", cur.Epoch, "err", err.Error())
			return fmt.Errorf("replication: persist epoch %d role %s for %s: %w", next.Epoch, next.Role, hv.name, err)
		}
	}
	if cur.Role != next.Role || cur.Epoch != next.Epoch || cur.PrimaryID != next.PrimaryID {
		h.log.Info(EvAuthorityChanged, "volume", hv.name, "role", string(next.Role), "epoch", next.Epoch, "primary", next.PrimaryID,
			"old_role", string(cur.Role), "old_epoch", cur.Epoch, "old_primary", cur.PrimaryID)
	}
	hv.auth.Store(&next)
	return nil
}

// Apply carries out an assignment. The epoch and role are persisted
// (fsync) before anything in memory changes; a stale epoch is refused; a
// primary is then created, updated (epoch, durability, replica set,
// lease) or demoted.
func (h *Host) Apply(a Assignment) error {
	if !a.Role.Valid() {
		return fmt.Errorf("replication: assignment for %s: unknown role %q", a.Volume, a.Role)
	}
	hv := h.get(a.Volume)
	if hv == nil {
		return fmt.Errorf("replication: assignment for unknown volume %s", a.Volume)
	}
	hv.amu.Lock()
	defer hv.amu.Unlock()
	if hv.removed {
		return fmt.Errorf("replication: assignment for removed volume %s", a.Volume)
	}
	next := authority{Role: a.Role, Epoch: a.Epoch, PrimaryID: a.PrimaryID,
		ActingSet: slices.Clone(a.ActingSet), MinCopies: a.MinCopies}
	if a.Role == RolePrimary {
		next.Lease = a.LeaseUntil
	}
	if err := h.setAuthorityLocked(hv, next); err != nil {
		if errors.Is(err, ErrStaleEpoch) {
			h.log.Warn(EvRefused, "volume", a.Volume, "reason", "stale_assignment", "epoch", a.Epoch, "current", max(hv.auth.Load().Epoch, hv.vol.Epoch()))
		}
		return fmt.Errorf("replication: assignment for %s: %w", a.Volume, err)
	}
	h.mu.Lock()
	prim := hv.primary.Load()
	if a.Role != RolePrimary {
		hv.primary.Store(nil)
	}
	h.mu.Unlock()
	if a.Role != RolePrimary {
		if prim != nil {
			prim.Close()
		}
		return nil
	}
	if prim != nil {
		return prim.Update(a)
	}
	cfg := h.cfg.Primary
	cfg.Volume, cfg.ServerID, cfg.Epoch, cfg.Durability, cfg.Replicas = a.Volume, h.cfg.ServerID, a.Epoch, a.Durability, a.Replicas
	cfg.ActingSet, cfg.MinCopies = a.ActingSet, a.MinCopies
	cfg.Logger = h.cfg.Logger
	cfg.WriteGate = func() error { return h.gate(hv) }
	p, err := NewPrimary(hv.vol, cfg)
	if err != nil {
		return err
	}
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		p.Close()
		return fmt.Errorf("replication: assignment for %s: host closed while starting the primary", a.Volume)
	}
	hv.primary.Store(p)
	h.mu.Unlock()
	return nil
}

// gate is the write gate of a volume's Primary, run before every write,
// trim, zero and flush. It reads the authority record and the volume's
// persisted epoch and role atomically (no lock) and checks:
//   - role: the record says primary, and so does the superblock;
//   - epoch: the superblock holds the record's epoch or a newer one of
//     this primary (an epoch bump between its persist and its publish),
//     never an older one, so no write runs at an epoch not on disk;
//   - lease: the clock is before the record's lease.
func (h *Host) gate(hv *hostVol) error {
	a := hv.auth.Load()
	pe, pr := hv.vol.Epoch(), hv.vol.Role()
	switch {
	case a.Role != RolePrimary:
		return fmt.Errorf("%w: volume %s role is %s (epoch %d)", blockdev.ErrNotPrimary, hv.name, a.Role, a.Epoch)
	case pr != string(RolePrimary):
		return fmt.Errorf("%w: volume %s persisted role is %s (epoch %d)", blockdev.ErrNotPrimary, hv.name, pr, pe)
	case pe < a.Epoch:
		return fmt.Errorf("%w: volume %s epoch %d not persisted (superblock has %d)", blockdev.ErrNotPrimary, hv.name, a.Epoch, pe)
	case !h.cfg.Now().Before(a.Lease):
		return fmt.Errorf("%w: volume %s lease expired at %s (epoch %d)", blockdev.ErrNotPrimary, hv.name, a.Lease.Format(time.RFC3339Nano), a.Epoch)
	}
	return nil
}

func (h *Host) lookup(name string) (ReplicaTarget, bool) {
	hv := h.get(name)
	if hv == nil {
		return ReplicaTarget{}, false
	}
	a := hv.auth.Load()
	if a.Role != RoleReplica && a.Role != RoleRebuilding {
		return ReplicaTarget{}, false
	}
	return ReplicaTarget{Vol: hv.vol, Epoch: a.Epoch, PrimaryID: a.PrimaryID, FS: hv.vol.FS()}, true
}

// advance moves a replica volume to a higher epoch announced in a Hello
// by the primary that its current assignment names (the master gave that
// primary a new epoch, for example on an acting-set change). The epoch
// is persisted before the new target is returned. Any other primary, a
// volume that is not a replica here or a lower epoch is refused.
func (h *Host) advance(name string, epoch uint64, primaryID string) (ReplicaTarget, error) {
	hv := h.get(name)
	if hv == nil {
		return ReplicaTarget{}, fmt.Errorf("replication: no replica volume %s", name)
	}
	hv.amu.Lock()
	defer hv.amu.Unlock()
	cur := hv.auth.Load()
	switch {
	case hv.removed || (cur.Role != RoleReplica && cur.Role != RoleRebuilding):
		return ReplicaTarget{}, fmt.Errorf("replication: volume %s is %s here, not a replica", name, cur.Role)
	case cur.PrimaryID == "" || primaryID != cur.PrimaryID:
		return ReplicaTarget{}, fmt.Errorf("%w: epoch %d from %q, the assignment names %q", ErrWrongPrimary, epoch, primaryID, cur.PrimaryID)
	case epoch < cur.Epoch:
		return ReplicaTarget{}, fmt.Errorf("%w: epoch %d below %d", ErrStaleEpoch, epoch, cur.Epoch)
	}
	if epoch > cur.Epoch {
		next := *cur
		next.Epoch = epoch
		if err := h.setAuthorityLocked(hv, next); err != nil {
			return ReplicaTarget{}, err
		}
		h.log.Info(EvEpochAdvanced, "volume", name, "epoch", epoch, "old_epoch", cur.Epoch, "primary", primaryID)
	}
	a := hv.auth.Load()
	return ReplicaTarget{Vol: hv.vol, Epoch: a.Epoch, PrimaryID: a.PrimaryID, FS: hv.vol.FS()}, nil
}

// Device is what the frontends export for a volume: the Primary (writes
// gated by role, epoch and lease) while this server is its primary. It
// takes no lock (a frontend may ask per request).
func (h *Host) Device(name string) (blockdev.Device, bool) {
	if p, ok := h.Primary(name); ok {
		return p, true
	}
	return nil, false
}

// Primary returns the volume's Primary while this server is its primary.
func (h *Host) Primary(name string) (*Primary, bool) {
	hv := h.get(name)
	if hv == nil {
		return nil, false
	}
	if p := hv.primary.Load(); p != nil {
		return p, true
	}
	return nil, false
}

// Status reports every hosted volume (for the heartbeat), sorted by name.
func (h *Host) Status() []VolumeStatus {
	vols := *h.vols.Load()
	names := make([]string, 0, len(vols))
	for n := range vols {
		names = append(names, n)
	}
	sort.Strings(names)
	out := make([]VolumeStatus, 0, len(names))
	for _, n := range names {
		hv := vols[n]
		a := hv.auth.Load()
		st := VolumeStatus{Volume: n, Role: a.Role, Epoch: a.Epoch, LeaseUntil: a.Lease,
			HeadLSN: hv.vol.HeadLSN(), CheckpointLSN: hv.vol.CheckpointLSN(), DurableLSN: hv.vol.DurableLSN()}
		if p := hv.primary.Load(); p != nil {
			st.Replicas = p.Replicas()
		}
		out = append(out, st)
	}
	return out
}

// Close stops the receiver and every primary. Volumes stay open.
func (h *Host) Close() error {
	h.recv.Close()
	h.mu.Lock()
	h.closed = true
	var ps []*Primary
	for _, hv := range *h.vols.Load() {
		if p := hv.primary.Swap(nil); p != nil {
			ps = append(ps, p)
		}
	}
	h.mu.Unlock()
	for _, p := range ps {
		p.Close()
	}
	return nil
}
