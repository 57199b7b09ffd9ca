package replication

import (
	"context"
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
	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

// Peer names one replica: a stable server ID (its identity) and the
// address of that server's replication listener (only an endpoint).
type Peer struct {
	ServerID string
	Addr     string
}

// PrimaryConfig configures NewPrimary. Zero values take the defaults noted.
type PrimaryConfig struct {
	Volume     string // volume name, carried in every message
	ServerID   string // this (primary) server's ID, for logs and Hello
	Epoch      uint64
	Durability Durability
	Replicas   []Peer
	// ActingSet and MinCopies: which replicas count for durability and the
	// floor of durable copies (see Assignment; both unset: every replica
	// counts and MinCopies is 1, as before acting sets existed).
	ActingSet []string
	MinCopies int
	// FlushWait bounds how long a flush that the acting set cannot
	// acknowledge waits for a member to return or for a new assignment
	// before it fails with EIO (default 4 s). Barriers of InSync members
	// are waited for without a bound: a slow disk is slow, not dead.
	FlushWait time.Duration
	// WriteGate is called before every read, block status, write, trim,
	// zero and flush (reads too: a deposed primary must not serve stale
	// data); a non-nil result refuses the request with
	// blockdev.ErrNotPrimary. The server checks role, epoch and lease
	// expiry here. nil: always open.
	WriteGate func() error
	Logger    *slog.Logger
	// StateDir, when set, holds the per-replica dirty-region bitmaps
	// (persisted at checkpoints), so a resync survives a primary restart.
	StateDir string
	FS       vfs.FS
	// RegionSize is the resync granularity (default 64 KiB).
	RegionSize int64
	CatchUp    CatchUpBudget   // zero: DefaultCatchUpBudget
	Retention  RetentionBudget // zero: DefaultRetentionBudget
	// Dial opens a connection to a replica (default: TCP with a 10 s timeout).
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// PingInterval (default 1 s) paces pings and background barriers.
	// DeadAfter (default 30 s): a session whose replica sends nothing at
	// all (not even a pong, which never waits for its disk) for this long
	// is ended. Barriers themselves have no timeout: a replica whose disk
	// is slow is slow, not dead.
	PingInterval time.Duration
	DeadAfter    time.Duration
	// RetryMax bounds the reconnect backoff (default 2 s).
	RetryMax time.Duration
	// MaxQueueBytes bounds the records queued for one replica (default
	// 64 MiB); past it the session is dropped and the replica catches up
	// from the WAL instead of holding memory.
	MaxQueueBytes int64
}

// ReplicaStatus is one replica as the primary sees it.
type ReplicaStatus struct {
	ServerID   string
	Addr       string
	State      ReplicaState
	FlushedLSN uint64
	Session    uint64
	// Cumulative bytes sent to this replica since the Primary was created.
	WALBytes  int64 // record payloads (live and catch-up)
	BaseBytes int64 // base data of rebuilds/resyncs (zero runs not counted)
	Transfers int   // completed base transfers
	// Progress is the catch-up, resync or rebuild in flight (nil: none);
	// Barrier the barrier round-trip latencies (stats.go).
	Progress *TransferProgress
	Barrier  BarrierStats
}

// Primary wraps the primary's volume: it implements blockdev.Device for
// the frontends, ships every record to the replicas and applies the
// durability rule to Flush and FUA writes.
type Primary struct {
	vol *blockvol.Volume
	cfg PrimaryConfig
	log *slog.Logger

	mu         sync.Mutex
	cond       *sync.Cond // broadcast on any replica state or FlushedLSN change
	epoch      uint64
	epochStart uint64 // first LSN of this primary's current epoch
	mode       Durability
	reps       map[string]*replica
	closed     bool
	members    []string // acting set: the replicas that count
	minCopies  int
	assignGen  uint64            // bumped when the epoch, mode, replicas or acting set change
	holds      map[string]uint64 // this primary's retention holds in the volume's set

	feed      *blockvol.RecordFeed
	shipMu    sync.Mutex // one pump at a time: records reach the queues in LSN order
	pumpReq   atomic.Bool
	shipRecs  []wal.Record
	shipItems []*item
	smu       sync.Mutex // shipper side: lastLSN, bitmaps, the replica list the shipper sees
	lastLSN   uint64
	shipReps  []*replica
	cumBytes  atomic.Int64

	wg     sync.WaitGroup
	stopCh chan struct{}

	bmThrough atomic.Uint64 // persisted bitmaps cover records up to here
	bmCkpt    atomic.Uint64

	flushTime flushTiming // primary_device.go
}

// NewPrimary subscribes to vol's record feed (one Primary per volume at a
// time: a second one fails with blockvol.ErrFeedBusy), adds its retention
// holds and starts a session to every replica. Replicas without a
// ServerID are refused (fail closed): they are logged as replica_rejected
// and NewPrimary returns an error wrapping ErrNoServerID and no primary.
func NewPrimary(vol *blockvol.Volume, cfg PrimaryConfig) (*Primary, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.FS == nil {
		cfg.FS = vfs.Default
	}
	if cfg.RegionSize <= 0 {
		cfg.RegionSize = 64 << 10
	}
	if cfg.CatchUp == (CatchUpBudget{}) {
		cfg.CatchUp = DefaultCatchUpBudget
	}
	if cfg.Retention == (RetentionBudget{}) {
		cfg.Retention = DefaultRetentionBudget
	}
	// A hold may never fill the WAL: writers would wait for space.
	if w := vol.WALSize() / 2; cfg.Retention.MaxBytes <= 0 || cfg.Retention.MaxBytes > w {
		cfg.Retention.MaxBytes = w
	}
	if cfg.StateDir == "" {
		cfg.StateDir = vol.Dir()
	}
	if cfg.Dial == nil {
		cfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
			d := net.Dialer{Timeout: 10 * time.Second, KeepAlive: 5 * time.Second}
			return d.DialContext(ctx, "tcp", addr)
		}
	}
	if cfg.PingInterval <= 0 {
		cfg.PingInterval = time.Second
	}
	if cfg.DeadAfter <= 0 {
		cfg.DeadAfter = 30 * time.Second
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = 2 * time.Second
	}
	if cfg.MaxQueueBytes <= 0 {
		cfg.MaxQueueBytes = 64 << 20
	}
	if cfg.FlushWait <= 0 {
		cfg.FlushWait = 4 * time.Second
	}
	if cfg.Volume == "" {
		return nil, fmt.Errorf("replication: NewPrimary: empty volume name")
	}
	if err := checkPeers(cfg.Replicas, cfg.Logger.With("side", "primary", "volume", cfg.Volume)); err != nil {
		return nil, fmt.Errorf("replication: NewPrimary %s: %w", cfg.Volume, err)
	}
	p := &Primary{vol: vol, cfg: cfg, epoch: cfg.Epoch, mode: cfg.Durability, reps: map[string]*replica{}, holds: map[string]uint64{}, stopCh: make(chan struct{}),
		log: cfg.Logger.With("side", "primary", "volume", cfg.Volume)}
	p.cond = sync.NewCond(&p.mu)
	// Records carry the volume's epoch: it must be this primary's.
	if e := vol.Epoch(); e > cfg.Epoch {
		return nil, fmt.Errorf("replication: NewPrimary %s: %w: volume epoch %d above assignment epoch %d", cfg.Volume, ErrStaleEpoch, e, cfg.Epoch)
	} else if e < cfg.Epoch || vol.Role() != "primary" {
		if err := vol.SetEpochRole(cfg.Epoch, "primary"); err != nil {
			return nil, fmt.Errorf("replication: NewPrimary %s: %w", cfg.Volume, err)
		}
	}
	p.lastLSN = vol.HeadLSN()
	p.epochStart = p.findEpochStart(cfg.Epoch)
	feed, err := vol.SubscribeRecords()
	if err != nil {
		return nil, fmt.Errorf("replication: NewPrimary %s: %w", cfg.Volume, err)
	}
	p.feed = feed
	p.wg.Add(1)
	go p.ship()
	err = p.Update(Assignment{Epoch: cfg.Epoch, Durability: cfg.Durability, Replicas: cfg.Replicas, ActingSet: cfg.ActingSet, MinCopies: cfg.MinCopies})
	p.wg.Add(1)
	go p.maintain()
	if err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// checkPeers refuses replicas without a ServerID (fail closed).
func checkPeers(peers []Peer, log *slog.Logger) error {
	var rejected []string
	for _, pr := range peers {
		if pr.ServerID == "" {
			log.Warn(EvReplicaRejected, "reason", "missing_server_id", "addr", pr.Addr)
			rejected = append(rejected, pr.Addr)
		}
	}
	if len(rejected) > 0 {
		return fmt.Errorf("replication: %w: %d replica(s) without server ID refused (addrs %v)", ErrNoServerID, len(rejected), rejected)
	}
	return nil
}

// actingMembers resolves an assignment's acting set: an assignment with
// neither an acting set nor MinCopies (from a master that predates acting
// sets, or a test) counts every replica; otherwise exactly the listed IDs
// count (nil or empty: none but the primary).
func actingMembers(a Assignment, want map[string]Peer) (members []string, minCopies int) {
	minCopies = max(a.MinCopies, 1)
	if a.ActingSet == nil && a.MinCopies == 0 {
		for id := range want {
			members = append(members, id)
		}
		sort.Strings(members)
		return members, minCopies
	}
	seen := map[string]bool{}
	for _, id := range a.ActingSet {
		if id != "" && !seen[id] {
			seen[id] = true
			members = append(members, id)
		}
	}
	sort.Strings(members)
	return members, minCopies
}

// Update applies a new assignment: its Epoch, Durability, Replicas,
// ActingSet and MinCopies (the role and lease are the Host's). Replicas
// are matched by ServerID: a known ID with a new address keeps its
// identity, progress, bitmap and (if healthy) its session; only the
// endpoint moves. A new epoch ends every session (late results of the old
// epoch are refused) and reconnects at once with a new Hello. Flushes
// waiting for the acting set are re-evaluated against the new one, and a
// change restarts their FlushWait. Entries without a ServerID are refused
// (fail closed) and reported in the returned error.
func (p *Primary) Update(a Assignment) error {
	epoch, mode, peers := a.Epoch, a.Durability, a.Replicas
	// Persist a new epoch first, outside p.mu (SetEpochRole takes the
	// volume's I/O lock, which a Drain may hold).
	p.mu.Lock()
	cur := p.epoch
	p.mu.Unlock()
	if epoch > cur && (p.vol.Epoch() < epoch || p.vol.Role() != string(RolePrimary)) {
		if err := p.vol.SetEpochRole(epoch, string(RolePrimary)); err != nil {
			return fmt.Errorf("replication: update to epoch %d: %w", epoch, err)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return blockdev.ErrClosed
	}
	var rejected []string
	want := map[string]Peer{}
	for _, pr := range peers {
		if pr.ServerID == "" {
			p.log.Warn(EvReplicaRejected, "reason", "missing_server_id", "addr", pr.Addr)
			rejected = append(rejected, pr.Addr)
			continue
		}
		want[pr.ServerID] = pr
	}
	epochChanged := epoch != p.epoch
	if epoch < p.epoch {
		return fmt.Errorf("replication: %w: update to epoch %d below current %d", ErrStaleEpoch, epoch, p.epoch)
	}
	if epochChanged {
		p.epochStart = p.vol.HeadLSN() + 1
	}
	members, minCopies := actingMembers(a, want)
	changed := epochChanged || mode != p.mode || minCopies != p.minCopies || !slices.Equal(members, p.members) || len(want) != len(p.reps)
	for id := range want {
		if p.reps[id] == nil {
			changed = true
		}
	}
	if changed {
		p.assignGen++
		var stale []string
		for id := range want {
			if !slices.Contains(members, id) {
				stale = append(stale, id)
			}
		}
		sort.Strings(stale)
		var unknown []string
		for _, id := range members {
			if _, ok := want[id]; !ok {
				unknown = append(unknown, id)
			}
		}
		// legacy: the assignment named neither a set nor min_copies, so
		// every replica counts (a master that predates acting sets).
		legacy := a.ActingSet == nil && a.MinCopies == 0
		p.log.Info(EvActingSet, "epoch", epoch, "mode", mode.String(), "acting_set", members, "stale", stale, "min_copies", minCopies, "legacy", legacy)
		if len(unknown) > 0 {
			p.log.Warn(EvActingSet, "epoch", epoch, "reason", "member_not_assigned", "members", unknown)
		}
	}
	p.epoch, p.mode, p.members, p.minCopies = epoch, mode, members, minCopies
	for id, r := range p.reps {
		if _, ok := want[id]; !ok {
			p.log.Info(EvPlanCancelled, "replica", id, "session", r.session, "reason", "replica_removed")
			delete(p.reps, id)
			if p.cfg.StateDir != "" {
				p.cfg.FS.Remove(bitmapPath(p.cfg.StateDir, id))
			}
			close(r.stop)
			if r.cur != nil {
				r.cur.fail(errors.New("replica removed"))
			}
		}
	}
	for id, pr := range want {
		r := p.reps[id]
		if r == nil {
			// An assigned replica is expected back: the WAL is held for it
			// (within the budget) from the start, so that it can catch up
			// or be truncated to a fork instead of being rebuilt.
			r = &replica{p: p, id: id, addr: pr.Addr, kick: make(chan struct{}, 1), stop: make(chan struct{}), notInSyncSince: time.Now(),
				everSynced: true, bytesAtLeave: p.cumBytes.Load()}
			r.qcond = sync.NewCond(&r.qmu)
			p.smu.Lock()
			r.bm = newDirtyBitmap(p.cfg.RegionSize, p.vol.Size(), p.lastLSN+1)
			p.smu.Unlock()
			p.loadBitmap(r)
			p.reps[id] = r
			p.wg.Add(1)
			go r.run()
			continue
		}
		if r.addr != pr.Addr {
			p.log.Info(EvEndpointMoved, "replica", id, "old_addr", r.addr, "new_addr", pr.Addr, "session", r.session, "state", r.state.String())
			r.addr = pr.Addr
			if r.cur == nil || r.state != InSync {
				// Not healthy on the old endpoint: retry at the new one now.
				if r.cur != nil {
					p.log.Info(EvPlanCancelled, "replica", id, "session", r.session, "reason", "endpoint_moved")
					r.cur.fail(errors.New("endpoint moved"))
				}
				r.wake()
			}
		}
		if epochChanged {
			// Re-Hello at the new epoch now (no backoff): the replica
			// answers InSync at once when nothing is missing.
			if r.cur != nil {
				p.log.Info(EvPlanCancelled, "replica", id, "session", r.session, "reason", "epoch_changed", "epoch", epoch)
				r.cur.fail(fmt.Errorf("epoch changed to %d", epoch))
			}
			r.wake()
		}
	}
	p.refreshShipLocked()
	p.syncHoldsLocked(time.Now())
	p.cond.Broadcast()
	if len(rejected) > 0 {
		return fmt.Errorf("replication: %w: %d replica(s) without server ID refused (addrs %v)", ErrNoServerID, len(rejected), rejected)
	}
	return nil
}

func (p *Primary) refreshShipLocked() {
	list := make([]*replica, 0, len(p.reps))
	for _, r := range p.reps {
		list = append(list, r)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].id < list[j].id })
	// With no replica the feed copies no data (a 1 MiB write would cost
	// a 1 MiB copy for nothing). It asks for data before a replica is
	// listed; records pushed before that are not shipped (pumpLocked).
	if len(list) > 0 {
		p.feed.SetPayloads(true)
	}
	p.smu.Lock()
	p.shipReps = list
	p.smu.Unlock()
	if len(list) == 0 {
		p.feed.SetPayloads(false)
	}
}

// findEpochStart returns the first LSN of the volume's log written in
// epoch: after a restart within the same epoch, the retained WAL is
// searched for its first record of that epoch; otherwise it is the next
// LSN. 0 when unknown (the epoch's first records were recycled).
func (p *Primary) findEpochStart(epoch uint64) uint64 {
	head := p.vol.HeadLSN()
	if head == 0 {
		return 1
	}
	var headEpoch uint64
	p.vol.ReadRecords(head, func(rec wal.Record) error { headEpoch = rec.Epoch; return errors.New("stop") })
	if headEpoch != epoch {
		return head + 1
	}
	var first uint64
	from := p.vol.OldestRetainedLSN()
	p.vol.ReadRecords(from, func(rec wal.Record) error {
		if rec.Epoch == epoch {
			first = rec.LSN
			return errors.New("stop")
		}
		return nil
	})
	if first == from && from > 1 {
		return 0 // the epoch may have begun before the retained WAL
	}
	return first
}

// committedLSN is the highest LSN durable on the primary and on every
// replica that is still expected back (what no failover can lose). A
// replica keeps the records above it, so a divergent tail stays listable.
func (p *Primary) committedLSN() uint64 {
	c := p.vol.DurableLSN()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.reps {
		if r.released || !r.everSynced {
			continue
		}
		c = min(c, r.flushed)
	}
	return c
}

// Replicas reports every replica, sorted by ServerID.
func (p *Primary) Replicas() []ReplicaStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]ReplicaStatus, 0, len(p.reps))
	for _, r := range p.reps {
		out = append(out, ReplicaStatus{ServerID: r.id, Addr: r.addr, State: r.state, FlushedLSN: r.flushed, Session: r.session,
			WALBytes: r.walBytes.Load(), BaseBytes: r.baseBytes.Load(), Transfers: r.transfers,
			Progress: r.prog.snapshot(), Barrier: r.bar.snapshot()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ServerID < out[j].ServerID })
	return out
}

// Epoch is the primary's current epoch.
func (p *Primary) Epoch() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.epoch
}

// Volume is the wrapped volume.
func (p *Primary) Volume() *blockvol.Volume { return p.vol }

// Close ends every session, releases the volume's record feed and this
// primary's retention holds (no other owner's) and fails waiting flushes.
// It does not close the volume.
func (p *Primary) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	close(p.stopCh)
	for _, r := range p.reps {
		close(r.stop)
		if r.cur != nil {
			r.cur.fail(blockdev.ErrClosed)
		}
	}
	p.cond.Broadcast()
	p.mu.Unlock()
	p.wg.Wait()
	p.feed.Close()
	p.bmCkpt.Store(^uint64(0)) // force a final persist
	p.persistBitmaps()
	p.mu.Lock()
	p.releaseHoldsLocked()
	p.mu.Unlock()
	return nil
}
