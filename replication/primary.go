package replication

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
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
	// WriteGate is called before every write, trim, zero and flush; a
	// non-nil result refuses the request with blockdev.ErrNotPrimary.
	// The server checks role, epoch and lease expiry here. nil: always open.
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
	assignGen  uint64 // bumped when the epoch, mode, replicas or acting set change

	smu      sync.Mutex // sink side: lastLSN, bitmaps, the replica list the sink sees
	lastLSN  uint64
	sinkReps []*replica
	cumBytes atomic.Int64

	wg     sync.WaitGroup
	stopCh chan struct{}

	bmThrough atomic.Uint64 // persisted bitmaps cover records up to here
	bmCkpt    atomic.Uint64
}

// item is one record encoded for the wire, shared by every replica queue
// it is put on; its buffer returns to a pool when the last one let go.
type item struct {
	lsn  uint64
	body []byte
	refs atomic.Int32
	buf  *[]byte // pooled backing store, nil if not pooled
}

var bodyPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096+64); return &b }}

func (it *item) release() {
	if it.refs.Add(-1) == 0 && it.buf != nil {
		*it.buf = it.body[:0]
		bodyPool.Put(it.buf)
		it.buf, it.body = nil, nil
	}
}

func releaseAll(items []*item) {
	for _, it := range items {
		it.release()
	}
}

type replica struct {
	p  *Primary
	id string

	// guarded by p.mu
	addr           string
	state          ReplicaState
	flushed        uint64
	everSynced     bool
	session        uint64
	cur            *session
	notInSyncSince time.Time
	bytesAtLeave   int64
	released       bool
	forceTransfer  string // escalation reason: next plan moves data instead of catching up
	failedAttempts int
	transfers      int

	kick chan struct{}
	stop chan struct{}

	// queue, guarded by qmu
	qmu         sync.Mutex
	qcond       *sync.Cond
	queue       []*item
	qbytes      int64
	attached    bool
	overflow    bool
	barrierWant uint64
	waiting     bool        // the sender sleeps on qcond
	live        atomic.Bool // mirror of attached, read by the sink without qmu

	// guarded by p.smu
	bm *dirtyBitmap

	walBytes  atomic.Int64
	baseBytes atomic.Int64
}

// NewPrimary takes over vol's record sink and retention floor and starts a
// session to every replica. Replicas without a ServerID are refused (fail
// closed): they are logged as replica_rejected and NewPrimary returns an
// error wrapping ErrNoServerID and no primary.
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
	p := &Primary{vol: vol, cfg: cfg, epoch: cfg.Epoch, mode: cfg.Durability, reps: map[string]*replica{}, stopCh: make(chan struct{}),
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
	vol.SetRecordSink(p.sink)
	vol.SetRetentionFloor(p.floor)
	err := p.Update(Assignment{Epoch: cfg.Epoch, Durability: cfg.Durability, Replicas: cfg.Replicas, ActingSet: cfg.ActingSet, MinCopies: cfg.MinCopies})
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
	// Persist a new epoch first, outside p.mu: the engine's flusher calls
	// the retention floor (p.mu) while a Drain may hold the I/O lock.
	p.mu.Lock()
	cur := p.epoch
	p.mu.Unlock()
	if epoch > cur && (p.vol.Epoch() < epoch || p.vol.Role() != RolePrimary) {
		if err := p.vol.SetEpochRole(epoch, RolePrimary); err != nil {
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
		p.log.Info(EvActingSet, "epoch", epoch, "mode", mode.String(), "acting_set", members, "stale", stale, "min_copies", minCopies)
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
	p.refreshSinkLocked()
	p.cond.Broadcast()
	if len(rejected) > 0 {
		return fmt.Errorf("replication: %w: %d replica(s) without server ID refused (addrs %v)", ErrNoServerID, len(rejected), rejected)
	}
	return nil
}

func (p *Primary) refreshSinkLocked() {
	list := make([]*replica, 0, len(p.reps))
	for _, r := range p.reps {
		list = append(list, r)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].id < list[j].id })
	p.smu.Lock()
	p.sinkReps = list
	p.smu.Unlock()
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
			WALBytes: r.walBytes.Load(), BaseBytes: r.baseBytes.Load(), Transfers: r.transfers})
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

// Close ends every session, releases the volume's record sink and
// retention floor and fails waiting flushes. It does not close the volume.
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
	p.vol.SetRecordSink(nil)
	p.wg.Wait()
	p.bmCkpt.Store(^uint64(0)) // force a final persist
	p.persistBitmaps()
	p.vol.SetRetentionFloor(nil)
	return nil
}

// ---- blockdev.Device ----

func (p *Primary) gate() error {
	if p.cfg.WriteGate == nil {
		return nil
	}
	if err := p.cfg.WriteGate(); err != nil {
		if errors.Is(err, blockdev.ErrNotPrimary) {
			return err
		}
		return fmt.Errorf("%w: %v", blockdev.ErrNotPrimary, err)
	}
	return nil
}

func (p *Primary) Size() int64                      { return p.vol.Size() }
func (p *Primary) BlockSize() int                   { return p.vol.BlockSize() }
func (p *Primary) ReadAt(b []byte, off int64) error { return p.vol.ReadAt(b, off) }
func (p *Primary) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	return p.vol.BlockStatus(off, length)
}

func (p *Primary) WriteAt(b []byte, off int64, fua bool) error {
	if err := p.gate(); err != nil {
		return err
	}
	if err := p.vol.WriteAt(b, off, false); err != nil {
		return err
	}
	if fua {
		return p.sync()
	}
	return nil
}

func (p *Primary) Trim(off, length int64) error {
	if err := p.gate(); err != nil {
		return err
	}
	return p.vol.Trim(off, length)
}

func (p *Primary) WriteZeroes(off, length int64, punch bool) error {
	if err := p.gate(); err != nil {
		return err
	}
	return p.vol.WriteZeroes(off, length, punch)
}

// Flush makes every acknowledged write durable locally and, per the
// durability mode, on the replicas. Under sync_all (and sync_quorum without
// a quorum) it fails with an error wrapping blockdev.ErrIO.
func (p *Primary) Flush() error {
	if err := p.gate(); err != nil {
		return err
	}
	return p.sync()
}

func (p *Primary) sync() error {
	lsn := p.vol.HeadLSN()
	p.requestBarriers(lsn) // replicas fsync while we do
	if err := p.vol.Flush(); err != nil {
		return err
	}
	return p.waitDurable(lsn)
}

func (p *Primary) requestBarriers(lsn uint64) {
	p.smu.Lock()
	reps := p.sinkReps
	p.smu.Unlock()
	for _, r := range reps {
		r.qmu.Lock()
		if lsn > r.barrierWant {
			r.barrierWant = lsn
			if r.waiting {
				r.qcond.Signal()
			}
		}
		r.qmu.Unlock()
	}
}

func (p *Primary) progressLocked() []ReplicaProgress {
	out := make([]ReplicaProgress, 0, len(p.reps))
	for _, r := range p.reps {
		out = append(out, ReplicaProgress{ID: r.id, State: r.state, FlushedLSN: r.flushed})
	}
	return out
}

func (p *Primary) ruleLocked() FlushRule {
	return FlushRule{Mode: p.mode, RF: 1 + len(p.reps), Members: p.members, MinCopies: p.minCopies}
}

// waitDurable waits until the acting set acknowledges lsn. While the
// decision is Blocked (members not InSync, or too few of them) it waits at
// most FlushWait, restarted by each new assignment, then fails with EIO.
func (p *Primary) waitDurable(lsn uint64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var (
		deadline time.Time
		since    time.Time
		timer    *time.Timer
		gen      uint64
	)
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		if p.closed {
			return fmt.Errorf("replication: flush at LSN %d: %w", lsn, blockdev.ErrClosed)
		}
		d := DecideFlush(p.ruleLocked(), p.progressLocked(), lsn)
		switch d.Outcome {
		case Succeed:
			return nil
		case Blocked:
			now := time.Now()
			if deadline.IsZero() || gen != p.assignGen {
				if since.IsZero() {
					since = now
				}
				gen, deadline = p.assignGen, now.Add(p.cfg.FlushWait)
				if timer != nil {
					timer.Stop()
				}
				timer = time.AfterFunc(p.cfg.FlushWait, func() {
					p.mu.Lock()
					p.cond.Broadcast()
					p.mu.Unlock()
				})
			} else if !now.Before(deadline) {
				waited := now.Sub(since).Round(time.Millisecond)
				p.log.Warn(EvFlushFailed, "lsn", lsn, "mode", p.mode.String(), "rule", d.Rule, "reason", d.Reason, "missing", d.Missing,
					"acting_set", p.members, "min_copies", p.minCopies, "copies", d.Copies, "need", d.Need, "waited", waited.String(), "detail", d.Detail)
				return fmt.Errorf("replication: flush at LSN %d: %s (%s), waited %s: %w", lsn, d.Reason, d.Detail, waited, blockdev.ErrIO)
			}
		}
		p.cond.Wait()
	}
}

// ---- record sink (under the engine's append lock: never blocks) ----

func (p *Primary) sink(rec wal.Record) {
	if rec.Type == wal.Padding {
		return
	}
	p.cumBytes.Add(int64(21 + len(rec.Payload)))
	p.smu.Lock()
	defer p.smu.Unlock()
	p.lastLSN = rec.LSN
	reps := p.sinkReps
	if len(reps) == 0 {
		return
	}
	var it *item
	for _, r := range reps {
		if rec.Type == wal.Write || rec.Type == wal.Zero {
			r.bm.mark(rec.Offset, int64(rec.Length))
		}
		if it == nil {
			it = &item{lsn: rec.LSN}
			n := 21 + len(rec.Payload)
			if n <= 4096+64 {
				it.buf = bodyPool.Get().(*[]byte)
				it.body = (*it.buf)[:0]
			} else {
				it.body = make([]byte, 0, n)
			}
			it.body = RecordBody{Type: uint8(rec.Type), Epoch: rec.Epoch, Offset: rec.Offset, Length: rec.Length, Data: rec.Payload}.Encode(it.body)
			it.refs.Store(int32(len(reps)) + 1) // +1: the sink's own reference
		}
		r.enqueue(it, p.cfg.MaxQueueBytes)
	}
	it.release() // the sink's own reference
}

// enqueue puts it on r's queue (taking one of its references) or lets
// the reference go.
func (r *replica) enqueue(it *item, limit int64) {
	r.qmu.Lock()
	if !r.attached {
		r.qmu.Unlock()
		it.release()
		return
	}
	var dropped []*item
	if r.qbytes+int64(len(it.body)) > limit {
		r.attached, r.overflow = false, true
		r.live.Store(false)
		dropped = append(r.queue, it)
		r.queue, r.qbytes = nil, 0
	} else {
		r.queue = append(r.queue, it)
		r.qbytes += int64(len(it.body))
	}
	if r.waiting {
		r.qcond.Signal()
	}
	r.qmu.Unlock()
	releaseAll(dropped)
}

// ---- retention ----

func (p *Primary) floor() (uint64, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.floorLocked(time.Now())
}

func (p *Primary) floorLocked(now time.Time) (uint64, bool) {
	var holds []Hold
	for _, r := range p.reps {
		if r.released || !r.everSynced {
			continue
		}
		h := Hold{ID: r.id, FromLSN: r.flushed + 1}
		if r.state != InSync {
			h.Since = r.notInSyncSince
			h.BytesAhead = p.cumBytes.Load() - r.bytesAtLeave
		}
		if ex, why := p.cfg.Retention.Exceeded(h, now); ex {
			r.released = true
			to := "rebuild"
			p.smu.Lock()
			if r.bm.from() <= r.flushed+1 {
				to = "resync"
			}
			p.smu.Unlock()
			p.log.Warn(EvRetentionRelease, "replica", r.id, "reason", why, "lsn", h.FromLSN)
			p.log.Warn(EvEscalated, "replica", r.id, "reason", why, "from_lsn", h.FromLSN, "head_lsn", p.vol.HeadLSN(), "to", to)
			continue
		}
		holds = append(holds, h)
	}
	if p.cfg.StateDir != "" && len(p.reps) > 0 {
		// Records not yet in a persisted bitmap stay in the WAL.
		holds = append(holds, Hold{ID: "bitmap", FromLSN: p.bmThrough.Load() + 1})
	}
	return RetentionFloor(holds)
}

// maintain evaluates retention budgets and rotates bitmaps periodically,
// so an escalation is logged even when the flusher is idle.
func (p *Primary) maintain() {
	defer p.wg.Done()
	t := time.NewTicker(p.cfg.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-p.stopCh:
			return
		case <-t.C:
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return
		}
		p.floorLocked(time.Now())
		p.mu.Unlock()
		p.persistBitmaps()
	}
}

// ---- state ----

// setStateLocked moves r to a new state, logging the transition.
func (r *replica) setStateLocked(to ReplicaState, reason string) {
	p := r.p
	from := r.state
	if from == to {
		return
	}
	if !CanTransition(from, to) {
		p.log.Warn("illegal_transition", "replica", r.id, "from", from.String(), "to", to.String(), "reason", reason)
	}
	r.state = to
	if from == InSync {
		r.notInSyncSince = time.Now()
		r.bytesAtLeave = p.cumBytes.Load()
	}
	if to == InSync {
		r.released = false
		r.forceTransfer = ""
		r.failedAttempts = 0
		r.everSynced = true
	}
	p.log.Info(EvStateChanged, "replica", r.id, "from", from.String(), "to", to.String(), "reason", reason, "flushed", r.flushed, "session", r.session)
	p.cond.Broadcast()
}

func (r *replica) wake() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// onFlushed records a barrier/done answer of session s.
func (r *replica) onFlushed(s *session, lsn uint64, viaDone bool) {
	p := r.p
	p.mu.Lock()
	defer p.mu.Unlock()
	if r.cur != s || s.failed() {
		p.log.Info(EvRefused, "replica", r.id, "session", s.id, "reason", "late_result_old_session", "lsn", lsn)
		return
	}
	if lsn > r.flushed {
		r.flushed = lsn
	}
	switch {
	case viaDone && r.state == Rebuilding && lsn >= s.promoteAt:
		r.transfers++
		p.log.Info(EvTransferDone, "replica", r.id, "session", s.id, "kind", s.kind.String(), "achieved_lsn", s.promoteAt, "target_lsn", s.target, "flushed", lsn, "base_bytes", s.baseBytes)
		r.setStateLocked(InSync, "transfer_done")
	case !viaDone && r.state == CatchingUp && s.promoteSet && lsn >= s.promoteAt:
		p.log.Info(EvCatchUpDone, "replica", r.id, "session", s.id, "lsn", s.promoteAt, "records", s.records)
		r.setStateLocked(InSync, "caught_up")
	}
	if r.state == InSync {
		r.everSynced = true
		p.smu.Lock()
		r.bm.rotate(r.flushed, p.lastLSN+1)
		p.smu.Unlock()
	}
	p.cond.Broadcast()
}

// ---- per-replica runner ----

func (r *replica) stopped() bool {
	select {
	case <-r.stop:
		return true
	default:
		return false
	}
}

func (r *replica) run() {
	p := r.p
	defer p.wg.Done()
	backoff := 50 * time.Millisecond
	for !r.stopped() {
		wasInSync, err := r.runSession()
		p.mu.Lock()
		r.cur = nil
		if r.state == CatchingUp && err != nil && r.forceTransfer == "" {
			r.failedAttempts++
			if esc, why := p.cfg.CatchUp.Verdict(r.failedAttempts, 0, 0); esc {
				r.forceTransfer = why
				p.log.Warn(EvEscalated, "replica", r.id, "reason", why, "from_lsn", r.flushed+1, "head_lsn", p.vol.HeadLSN(), "to", "transfer", "last_error", err.Error())
			}
		}
		if r.state != NeedsRebuild {
			to := Degraded
			if r.state == Connecting && !wasInSync {
				to = Disconnected
			}
			reason := "session_ended"
			if err != nil {
				reason = err.Error()
			}
			r.setStateLocked(to, reason)
		}
		p.mu.Unlock()
		r.detach()
		if wasInSync {
			backoff = 50 * time.Millisecond
		}
		select {
		case <-r.stop:
			return
		case <-r.kick:
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, p.cfg.RetryMax)
	}
}

func (r *replica) attach() {
	r.qmu.Lock()
	r.attached, r.overflow = true, false
	old := r.queue
	r.queue, r.qbytes = nil, 0
	r.live.Store(true)
	r.qmu.Unlock()
	releaseAll(old)
}

func (r *replica) detach() {
	r.qmu.Lock()
	r.attached = false
	r.live.Store(false)
	old := r.queue
	r.queue, r.qbytes = nil, 0
	r.qcond.Broadcast()
	r.qmu.Unlock()
	releaseAll(old)
}

// session is one connection to a replica.
type session struct {
	r     *replica
	id    uint64
	epoch uint64
	conn  net.Conn
	bw    *bufio.Writer
	mr    *MsgReader
	log   *slog.Logger

	once   sync.Once
	done   chan struct{}
	err    error
	heard  atomic.Int64
	respCh chan *Msg

	// sender state (sender goroutine only)
	next         uint64 // next LSN to send
	barrierSent  uint64
	lastBgBar    time.Time
	records      int64
	walStart     time.Time
	walBytes     int64
	kind         TransferKind
	target       uint64
	regions      []uint32 // nil with all=true
	all          bool
	progress     int64 // regions sent
	nRegions     int64
	doneSent     bool
	allowBarrier bool
	baseBytes    int64

	promoteAt  uint64 // guarded by p.mu (set before InSync can happen)
	promoteSet bool   // guarded by p.mu
	forceBar   bool   // sender: send a barrier now
}

func (s *session) fail(err error) {
	s.once.Do(func() {
		s.err = err
		close(s.done)
		s.conn.Close()
		s.r.qmu.Lock()
		s.r.qcond.Broadcast()
		s.r.qmu.Unlock()
	})
}

func (s *session) failed() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

func (s *session) write(m *Msg) error {
	m.Volume, m.Epoch, m.Session = s.r.p.cfg.Volume, s.epoch, s.id
	return WriteFrame(s.bw, m)
}

var errEscalate = errors.New("escalate")

// runSession connects, handshakes, plans and runs until the session ends.
func (r *replica) runSession() (wasInSync bool, err error) {
	p := r.p
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return false, blockdev.ErrClosed
	}
	addr, epoch := r.addr, p.epoch
	sid := rand.Uint64() | 1
	r.session = sid
	r.setStateLocked(Connecting, "connect")
	p.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	go func() {
		select {
		case <-r.stop:
		case <-ctx.Done():
		}
		cancel()
	}()
	conn, err := p.cfg.Dial(ctx, addr)
	cancel()
	if err != nil {
		return false, fmt.Errorf("dial %s: %w", addr, err)
	}
	s := &session{r: r, id: sid, epoch: epoch, conn: conn, bw: bufio.NewWriterSize(conn, 256<<10),
		done: make(chan struct{}), respCh: make(chan *Msg, 4)}
	s.log = p.log.With("replica", r.id, "session", sid, "epoch", epoch)
	s.heard.Store(time.Now().UnixNano())
	p.mu.Lock()
	if p.closed || r.stopped() || p.epoch != epoch || r.addr != addr {
		p.mu.Unlock()
		conn.Close()
		return false, errors.New("assignment changed while connecting")
	}
	r.cur = s
	p.mu.Unlock()
	defer s.fail(errors.New("session over"))
	s.log.Info(EvSessionCreated, "addr", addr)

	err = s.runLocked()
	p.mu.Lock()
	wasInSync = r.state == InSync
	p.mu.Unlock()
	s.fail(err)
	<-s.done
	if s.err != nil {
		err = s.err
	}
	s.log.Info(EvSessionEnded, "reason", fmt.Sprint(err))
	return wasInSync, err
}

func (s *session) runLocked() error {
	r, p := s.r, s.r.p
	vol := p.vol
	// Handshake.
	H, S := vol.HeadLSN(), vol.OldestRetainedLSN()
	p.mu.Lock()
	epochStart := p.epochStart
	p.mu.Unlock()
	if err := s.write(&Msg{Type: MsgHello, Payload: Hello{PrimaryID: p.cfg.ServerID, TargetServerID: r.id, HeadLSN: H, OldestLSN: S,
		RegionSize: uint32(p.cfg.RegionSize), EpochStartLSN: epochStart}.Encode()}); err != nil {
		return err
	}
	if err := s.bw.Flush(); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	s.conn.SetReadDeadline(time.Now().Add(p.cfg.DeadAfter))
	s.mr = NewMsgReader(s.conn)
	m, err := s.mr.Read()
	if err != nil {
		return fmt.Errorf("read hello reply: %w", err)
	}
	s.conn.SetReadDeadline(time.Time{})
	if m.Type == MsgError {
		eb, _ := DecodeErrorBody(m.Payload)
		s.log.Warn(EvRefused, "code", eb.Code, "detail", eb.Message)
		return &RemoteError{eb}
	}
	if m.Type != MsgHelloResp || m.Session != s.id || m.Epoch != s.epoch {
		return fmt.Errorf("%w: unexpected %s (session %d epoch %d) in handshake", ErrBadFrame, m.Type, m.Session, m.Epoch)
	}
	hr, err := DecodeHelloResp(m.Payload)
	if err != nil {
		return err
	}
	p.smu.Lock()
	bmFrom := r.bm.from()
	p.smu.Unlock()
	facts := Facts{ReplicaFlushed: hr.FlushedLSN, ReplicaHead: hr.HeadLSN, PrimaryHead: H, OldestRetained: S,
		Blank: hr.Blank, Trusted: !hr.Untrusted, BitmapOK: true, BitmapFrom: bmFrom, ForkLSN: hr.ForkLSN, DivergentKnown: hr.DivergentKnown,
		PendingResumable: hr.HasPending && hr.Pending.Epoch == s.epoch && S <= hr.FlushedLSN+1, PendingKind: hr.Pending.Kind}
	plan := Decide(facts)
	p.mu.Lock()
	force := r.forceTransfer
	if s.failed() {
		p.mu.Unlock()
		return s.err
	}
	r.flushed = hr.FlushedLSN // the handshake is authoritative, not a cached value
	p.mu.Unlock()
	if force != "" && (plan.Kind == PlanCatchUp || plan.Kind == PlanInSync) {
		if bmFrom <= hr.FlushedLSN+1 && !hr.Blank {
			plan = Plan{Kind: PlanResync, From: hr.FlushedLSN + 1, To: H, Reason: "escalated", Detail: force}
		} else {
			plan = Plan{Kind: PlanRebuild, Reason: "escalated", Detail: force}
		}
	}
	s.log.Info(EvPlanChosen, "plan", plan.Kind.String(), "reason", plan.Reason, "detail", plan.Detail, "from", plan.From, "to", plan.To,
		"replica_flushed", hr.FlushedLSN, "replica_head", hr.HeadLSN, "primary_head", H, "oldest_retained", S)

	go s.recvLoop()
	go s.pinger()

	switch plan.Kind {
	case PlanInSync, PlanCatchUp:
		s.next = hr.FlushedLSN + 1
		p.mu.Lock()
		r.setStateLocked(CatchingUp, plan.Reason)
		p.mu.Unlock()
		s.allowBarrier = true
	case PlanTruncateThenCatchUp:
		reset := H
		if hr.ForkLSN != 0 && hr.ForkLSN <= H+1 {
			reset = hr.ForkLSN - 1
		}
		s.kind, s.regions = TransferTrunc, hr.Divergent
		if err := s.begin(Begin{Kind: TransferTrunc, ResetLSN: reset, RegionSize: uint32(p.cfg.RegionSize), Regions: hr.Divergent}); err != nil {
			return err
		}
		s.next = reset + 1
	case PlanResync, PlanRebuild:
		T := vol.HeadLSN()
		b := Begin{Kind: TransferRebuild, ResetLSN: T, RegionSize: uint32(p.cfg.RegionSize), AllRegions: true}
		if plan.Kind == PlanResync {
			p.smu.Lock()
			b.Kind, b.AllRegions, b.Regions = TransferResync, false, r.bm.regions()
			p.smu.Unlock()
		}
		s.kind, s.regions, s.all = b.Kind, b.Regions, b.AllRegions
		if err := s.begin(b); err != nil {
			return err
		}
		s.next = T + 1
	case PlanResume:
		pd := hr.Pending
		s.kind, s.regions, s.all, s.progress = pd.Kind, pd.Regions, pd.All, pd.Progress
		if err := s.begin(Begin{Kind: pd.Kind, ResetLSN: pd.ResetLSN, RegionSize: uint32(p.cfg.RegionSize), Resume: true}); err != nil {
			return err
		}
		s.next = hr.FlushedLSN + 1
	}
	return s.stream()
}

func (s *session) begin(b Begin) error {
	p := s.r.p
	s.target = b.ResetLSN
	s.nRegions = int64(len(b.Regions))
	if b.AllRegions || s.all {
		s.all = true
		s.nRegions = (p.vol.Size() + p.cfg.RegionSize - 1) / p.cfg.RegionSize
	}
	s.allowBarrier = true // answers advance the retention hold; only MsgDone promotes
	p.mu.Lock()
	r := s.r
	r.setStateLocked(Rebuilding, b.Kind.String())
	if !b.Resume {
		r.flushed = b.ResetLSN // the replica's log restarts there
	}
	// Hold the WAL from the replica's durable point so that an interrupted
	// transfer can resume; the budget clock starts now.
	r.everSynced = true
	r.notInSyncSince = time.Now()
	r.bytesAtLeave = p.cumBytes.Load()
	p.mu.Unlock()
	s.log.Info(EvTransferBegun, "kind", b.Kind.String(), "reset_lsn", b.ResetLSN, "regions", s.nRegions, "progress", s.progress, "resume", b.Resume)
	return s.write(&Msg{Type: MsgBegin, Payload: b.Encode()})
}

func (s *session) recvLoop() {
	for {
		m, err := s.mr.Read()
		if err != nil {
			s.fail(fmt.Errorf("read: %w", err))
			return
		}
		s.heard.Store(time.Now().UnixNano())
		if m.Session != s.id || m.Epoch != s.epoch {
			s.log.Warn(EvRefused, "reason", "late_result_old_session", "msg_session", m.Session, "msg_epoch", m.Epoch, "type", m.Type.String())
			continue
		}
		switch m.Type {
		case MsgBarrierResp:
			s.r.onFlushed(s, m.LSNTo, false)
		case MsgDoneResp:
			s.r.onFlushed(s, m.LSNTo, true)
		case MsgProgress:
			// The transfer is moving: its retention budget measures stalls.
			p := s.r.p
			p.mu.Lock()
			if s.r.cur == s {
				s.r.notInSyncSince = time.Now()
				s.r.bytesAtLeave = p.cumBytes.Load()
			}
			p.mu.Unlock()
		case MsgPong:
		case MsgError:
			eb, _ := DecodeErrorBody(m.Payload)
			s.log.Warn(EvRefused, "code", eb.Code, "detail", eb.Message)
			s.fail(&RemoteError{eb})
			return
		default:
			s.fail(fmt.Errorf("%w: unexpected %s from replica", ErrBadFrame, m.Type))
			return
		}
	}
}

func (s *session) pinger() {
	p := s.r.p
	t := time.NewTicker(p.cfg.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		if time.Since(time.Unix(0, s.heard.Load())) > p.cfg.DeadAfter {
			s.fail(fmt.Errorf("replica silent for %s", p.cfg.DeadAfter))
			return
		}
		s.r.qmu.Lock()
		s.r.qcond.Broadcast() // the sender pings and sends background barriers
		s.r.qmu.Unlock()
	}
}

// stream runs the sender: WAL catch-up from s.next, then live records
// interleaved with base data, barriers and pings, until the session fails.
func (s *session) stream() error {
	r, p := s.r, s.r.p
	s.walStart = time.Now()
	// Pass 1 (bulk) without queueing, then attach the live queue and
	// converge: every record is either in the WAL (≤ head) or queued.
	if err := s.streamWAL(p.vol.HeadLSN()); err != nil {
		return err
	}
	r.attach()
	for stuck := 0; ; {
		h := p.vol.HeadLSN()
		r.qmu.Lock()
		target := h
		if len(r.queue) > 0 {
			target = r.queue[0].lsn - 1
		}
		overflow := r.overflow
		r.qmu.Unlock()
		if overflow {
			return errors.New("live queue overflow during catch-up")
		}
		if s.next > target {
			break
		}
		before := s.next
		if err := s.streamWAL(target); err != nil {
			return err
		}
		if s.next == before {
			if stuck++; stuck > 10000 {
				return fmt.Errorf("catch-up stuck at LSN %d (target %d)", s.next, target)
			}
			time.Sleep(500 * time.Microsecond)
		} else {
			stuck = 0
		}
	}
	p.mu.Lock()
	if s.r.state == CatchingUp {
		// A barrier covering everything sent so far makes it InSync.
		s.promoteAt, s.promoteSet = s.next-1, true
		s.forceBar = true
	}
	p.mu.Unlock()
	return s.live()
}

// streamWAL sends retained records [s.next, target].
func (s *session) streamWAL(target uint64) error {
	p := s.r.p
	if s.next > target {
		return nil
	}
	errStop := errors.New("stop")
	err := p.vol.ReadRecords(s.next, func(rec wal.Record) error {
		if rec.Type == wal.Padding || rec.LSN < s.next {
			return nil
		}
		if rec.LSN > target {
			return errStop
		}
		if rec.LSN != s.next {
			return fmt.Errorf("WAL gap: expected LSN %d, read %d", s.next, rec.LSN)
		}
		body := RecordBody{Type: uint8(rec.Type), Epoch: rec.Epoch, Offset: rec.Offset, Length: rec.Length, Data: rec.Payload}.Encode(nil)
		if err := s.write(&Msg{Type: MsgRecord, LSNFrom: rec.LSN, LSNTo: rec.LSN, Payload: body}); err != nil {
			return err
		}
		s.next++
		s.records++
		s.walBytes += int64(len(body))
		s.r.walBytes.Add(int64(len(body)))
		if s.failed() {
			return s.err
		}
		if esc, why := p.cfg.CatchUp.Verdict(0, time.Since(s.walStart), s.walBytes); esc {
			return s.escalate(why)
		}
		return nil
	})
	if errors.Is(err, errStop) {
		err = nil
	}
	if errors.Is(err, blockvol.ErrNotRetained) {
		return s.escalate(fmt.Sprintf("wal_recycled_during_catchup: need LSN %d, oldest retained=%d", s.next, p.vol.OldestRetainedLSN()))
	}
	return err
}

func (s *session) escalate(why string) error {
	r, p := s.r, s.r.p
	p.mu.Lock()
	r.forceTransfer = why
	p.log.Warn(EvEscalated, "replica", r.id, "session", s.id, "reason", why, "from_lsn", r.flushed+1, "head_lsn", p.vol.HeadLSN(), "to", "transfer")
	p.mu.Unlock()
	return fmt.Errorf("%w: %s", errEscalate, why)
}

const baseChunk = 1 << 20

// live is the steady state of a session.
func (s *session) live() error {
	r, p := s.r, s.r.p
	var zero [baseChunk]byte
	buf := make([]byte, baseChunk)
	for {
		r.qmu.Lock()
		for len(r.queue) == 0 && !r.overflow && !s.failed() &&
			!(((r.barrierWant > s.barrierSent && s.next-1 >= r.barrierWant) || s.forceBar) && s.allowBarrier) && !s.baseRemaining() && !s.bgDue() &&
			!(s.kind != TransferNone && !s.baseRemaining() && !s.doneSent) {
			r.waiting = true
			r.qcond.Wait()
			r.waiting = false
		}
		if s.failed() {
			r.qmu.Unlock()
			return s.err
		}
		if r.overflow {
			r.qmu.Unlock()
			return errors.New("live queue overflow (replica too slow)")
		}
		items := r.queue
		r.queue, r.qbytes = nil, 0
		want := r.barrierWant
		r.qmu.Unlock()
		for i, it := range items {
			if it.lsn < s.next {
				it.release()
				continue
			}
			if it.lsn != s.next {
				releaseAll(items[i:])
				return fmt.Errorf("live gap: expected LSN %d, queued %d", s.next, it.lsn)
			}
			n := len(it.body)
			err := s.write(&Msg{Type: MsgRecord, LSNFrom: it.lsn, LSNTo: it.lsn, Payload: it.body})
			it.release() // the frame was copied into the buffered writer (or written)
			if err != nil {
				releaseAll(items[i+1:])
				return err
			}
			s.next++
			r.walBytes.Add(int64(n))
		}
		if s.baseRemaining() {
			if err := s.sendBase(buf, zero[:]); err != nil {
				return err
			}
		} else if s.kind != TransferNone && !s.doneSent {
			achieved := s.next - 1
			p.mu.Lock()
			s.promoteAt, s.promoteSet = achieved, true
			p.mu.Unlock()
			if err := s.write(&Msg{Type: MsgDone, LSNTo: achieved}); err != nil {
				return err
			}
			s.doneSent, s.allowBarrier = true, true
			s.log.Info("transfer_sent", "kind", s.kind.String(), "achieved_lsn", achieved, "target_lsn", s.target, "base_bytes", s.baseBytes)
		}
		// A barrier covers everything sent so far. One is sent when a flush
		// wants an LSN that has been sent and is not yet covered (the
		// records of a flush reach the queue right after its LSN is
		// assigned), when the catch-up needs one, and periodically so the
		// replica's FlushedLSN (the retention hold) keeps moving.
		lsn := s.next - 1
		if s.allowBarrier && ((want > s.barrierSent && lsn >= want) || s.forceBar || (s.bgDue() && lsn > s.barrierSent)) {
			s.forceBar = false
			if err := s.write(&Msg{Type: MsgBarrier, LSNFrom: p.committedLSN(), LSNTo: lsn}); err != nil {
				return err
			}
			s.barrierSent = lsn
			s.lastBgBar = time.Now()
		} else if s.bgDue() {
			if err := s.write(&Msg{Type: MsgPing}); err != nil {
				return err
			}
			s.lastBgBar = time.Now()
		}
		if err := s.bw.Flush(); err != nil {
			return err
		}
	}
}

func (s *session) bgDue() bool { return time.Since(s.lastBgBar) >= s.r.p.cfg.PingInterval }

func (s *session) baseRemaining() bool { return s.kind != TransferNone && s.progress < s.nRegions }

func (s *session) region(i int64) int64 {
	if s.all {
		return i
	}
	return int64(s.regions[i])
}

// sendBase sends the next run of contiguous regions (up to baseChunk).
func (s *session) sendBase(buf, zero []byte) error {
	p := s.r.p
	rs := p.cfg.RegionSize
	size := p.vol.Size()
	first := s.region(s.progress)
	n := int64(1)
	for s.progress+n < s.nRegions && s.region(s.progress+n) == first+n && (n+1)*rs <= baseChunk {
		n++
	}
	off := first * rs
	length := min(n*rs, size-off)
	if length <= 0 || off >= size {
		s.progress += n
		return nil
	}
	data := buf[:length]
	if err := p.vol.ReadAt(data, off); err != nil {
		return fmt.Errorf("read base at %d: %w", off, err)
	}
	s.progress += n
	c := BaseChunk{Offset: off, Length: uint32(length), Done: s.progress}
	if string(data) == string(zero[:length]) {
		c.Zero = true
	} else {
		c.Data = data
		s.baseBytes += length
		s.r.baseBytes.Add(length)
	}
	return s.write(&Msg{Type: MsgBase, Payload: c.Encode(make([]byte, 0, 32+len(c.Data)))})
}
