package replication

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/vfs"
	"github.com/blockd/blockd/wal"
)

// ReplicaTarget is what the volume server tells the receiver about one of
// its replica volumes.
type ReplicaTarget struct {
	Vol *blockvol.Volume
	// Epoch is the epoch the master assigned to this server for the volume.
	// Only a primary of exactly this epoch is served.
	Epoch uint64
	// PrimaryID is the server the master's assignment names as the
	// volume's primary at Epoch: the only one whose session is accepted.
	// Empty: none is (fail closed).
	PrimaryID string
	// Dir is where the receiver keeps its transfer state (resume point of
	// an interrupted rebuild/resync). Empty: the volume's directory.
	Dir string
	// FS holds Dir's state files (repl-transfer.json, repl-lineage.json);
	// nil: ReceiverConfig.FS. A Host passes the volume's own FS.
	FS vfs.FS
}

// ReceiverConfig configures the replica side.
type ReceiverConfig struct {
	// ServerID is this server's stable ID. A primary that names another
	// server in its Hello is refused (address reuse never misdirects data).
	ServerID string
	// Lookup finds a replica volume by name. It is called for every
	// message, so an epoch bump by the server fences the old primary at
	// its very next record or barrier.
	Lookup func(volume string) (ReplicaTarget, bool)
	// Advance is asked when the named primary's Hello carries an epoch
	// above the target's: it persists the higher epoch and returns the
	// new target, or refuses. nil: such a Hello is refused as stale.
	Advance func(volume string, epoch uint64, primaryID string) (ReplicaTarget, error)
	Logger  *slog.Logger
	FS      vfs.FS
}

// PeerServerIDer is implemented by connections that know the verified
// server ID of their peer (the TLS listener the server hands to
// Host.Serve); the receiver then accepts a Hello only from that ID.
type PeerServerIDer interface {
	PeerServerID() (string, error)
}

// Receiver serves every replica volume of a volume server on one listener.
type Receiver struct {
	cfg ReceiverConfig
	log *slog.Logger

	mu     sync.Mutex
	vols   map[string]*rvol
	lns    []net.Listener
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup

	refusals refusalLog // hello_refused, rate-limited per volume, peer and code
}

// rvol serialises sessions of one volume: a new session closes the old
// connection and waits for its handler to finish before it starts.
type rvol struct {
	mu      sync.Mutex
	run     sync.Mutex
	session uint64
	conn    net.Conn

	// Tail retention on the replica: records above the primary's
	// committed LSN (durable on every replica) are kept in the WAL, within
	// a byte cap, so that a divergent tail can still be listed and
	// truncated after a failover.
	tmu       sync.Mutex
	vol       *blockvol.Volume
	committed uint64
	tail      []tailEnt
	tailBytes int64
	tailCap   int64
	held      uint64 // LSN of the retention hold on vol (0: none)
}

// tailHoldID names the replica's tail hold among the engine's retention
// holds (the primary keeps its own, one per replica, under other IDs).
const tailHoldID = "replica_tail"

type tailEnt struct {
	lsn  uint64
	size int64
}

func (v *rvol) install(vol *blockvol.Volume) {
	v.tmu.Lock()
	defer v.tmu.Unlock()
	if v.vol == vol {
		return
	}
	v.releaseLocked()
	v.vol, v.tail, v.tailBytes, v.committed = vol, nil, 0, 0
	v.tailCap = vol.WALSize() / 4
}

// syncHoldLocked pushes the tail's first LSN to the engine as this
// replica's retention hold (or releases it when the tail is empty). The
// engine owns the holds; nothing of replication runs under its locks.
func (v *rvol) syncHoldLocked() {
	if v.vol == nil {
		return
	}
	want := uint64(0)
	if len(v.tail) > 0 {
		want = v.tail[0].lsn
	}
	if want == v.held {
		return
	}
	if want == 0 {
		v.vol.ReleaseRetention(tailHoldID)
	} else {
		v.vol.HoldRetention(tailHoldID, want)
	}
	v.held = want
}

// releaseLocked drops the hold on the installed volume, if any.
func (v *rvol) releaseLocked() {
	if v.vol != nil && v.held != 0 {
		v.vol.ReleaseRetention(tailHoldID)
	}
	v.held = 0
}

func (v *rvol) commit(lsn uint64) {
	v.tmu.Lock()
	defer v.tmu.Unlock()
	if lsn <= v.committed {
		return
	}
	v.committed = lsn
	i := 0
	for i < len(v.tail) && v.tail[i].lsn <= lsn {
		v.tailBytes -= v.tail[i].size
		i++
	}
	v.tail = v.tail[i:]
	if len(v.tail) == 0 {
		v.tail = nil
	}
	v.syncHoldLocked()
}

// reset forgets the retained tail (the log was reset by a transfer).
func (v *rvol) reset(lsn uint64) {
	v.tmu.Lock()
	v.tail, v.tailBytes, v.committed = nil, 0, lsn
	v.syncHoldLocked()
	v.tmu.Unlock()
}

// NewReceiver makes a receiver; call Serve with a listener.
func NewReceiver(cfg ReceiverConfig) *Receiver {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.FS == nil {
		cfg.FS = vfs.Default
	}
	return &Receiver{cfg: cfg, log: cfg.Logger.With("side", "replica", "server", cfg.ServerID),
		vols: map[string]*rvol{}, conns: map[net.Conn]struct{}{}}
}

// Serve accepts primaries on ln until Close. It returns nil after Close.
func (r *Receiver) Serve(ln net.Listener) error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		ln.Close()
		return nil
	}
	r.lns = append(r.lns, ln)
	r.mu.Unlock()
	for {
		c, err := ln.Accept()
		if err != nil {
			r.mu.Lock()
			closed := r.closed
			r.mu.Unlock()
			if closed {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("replication: accept: %w", err)
		}
		r.mu.Lock()
		if r.closed {
			r.mu.Unlock()
			c.Close()
			return nil
		}
		r.conns[c] = struct{}{}
		r.wg.Add(1)
		r.mu.Unlock()
		go func() {
			defer r.wg.Done()
			r.handle(c)
			c.Close()
			r.mu.Lock()
			delete(r.conns, c)
			r.mu.Unlock()
		}()
	}
}

// Close stops accepting, ends every session and waits for the handlers.
func (r *Receiver) Close() error {
	r.mu.Lock()
	r.closed = true
	for _, ln := range r.lns {
		ln.Close()
	}
	for c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
	return nil
}

// Forget drops what the receiver keeps for a volume the server no longer
// hosts: its live session is closed and waited for, and its tail hold is
// released, so Receiver.vols holds only hosted volumes.
func (r *Receiver) Forget(name string) {
	r.mu.Lock()
	v := r.vols[name]
	delete(r.vols, name)
	r.mu.Unlock()
	if v == nil {
		return
	}
	v.mu.Lock()
	if v.conn != nil {
		v.conn.Close()
	}
	v.mu.Unlock()
	// Taking run waits until the session's handler has returned; the hold
	// is released while no handler can apply a record.
	v.run.Lock()
	v.tmu.Lock()
	v.releaseLocked()
	v.vol = nil
	v.tmu.Unlock()
	v.run.Unlock()
}

func (r *Receiver) rv(name string) *rvol {
	r.mu.Lock()
	defer r.mu.Unlock()
	v := r.vols[name]
	if v == nil {
		v = &rvol{}
		r.vols[name] = v
	}
	return v
}

// rconn is one primary connection.
type rconn struct {
	r      *Receiver
	c      net.Conn
	mr     *MsgReader
	wmu    sync.Mutex
	bw     *bufio.Writer // guarded by wmu
	volume string
	fence  Fence
	tgt    ReplicaTarget
	log    *slog.Logger

	// barrier worker
	bmu     sync.Mutex
	bcond   *sync.Cond
	bwant   uint64
	bdone   bool
	bactive bool

	xfer        *rxfer
	lineageDone bool
	rv          *rvol
	batch       rbatch // the apply path's batch (receiver_apply.go)
}

func (rc *rconn) send(m *Msg) error {
	m.Volume, m.Epoch, m.Session = rc.volume, rc.fence.Epoch, rc.fence.Session
	rc.wmu.Lock()
	defer rc.wmu.Unlock()
	rc.c.SetWriteDeadline(time.Now().Add(60 * time.Second))
	if err := WriteFrame(rc.bw, m); err != nil {
		rc.bw.Reset(rc.c) // a failed frame is not half sent on a later flush
		return err
	}
	return rc.bw.Flush()
}

// refuseHello refuses a session at its Hello without touching the live
// one, and logs who asked and who is named.
// A peer that keeps sending refused Hellos is logged once per
// refusalLogEvery (with the number of refusals in between), not once
// per Hello.
func (rc *rconn) refuseHello(code, msg string, h Hello, tgt ReplicaTarget) {
	if n, ok := rc.r.refusals.note(rc.volume+"\x00"+h.PrimaryID+"\x00"+code, time.Now()); ok {
		rc.log.Warn(EvHelloRefused, "code", code, "detail", msg, "primary", h.PrimaryID, "named_primary", tgt.PrimaryID,
			"replica_epoch", tgt.Epoch, "remote", rc.c.RemoteAddr().String(), "refused_since_last_log", n)
	}
	rc.send(&Msg{Type: MsgError, Payload: ErrorBody{Code: code, Message: msg}.Encode()})
}

const refusalLogEvery = 10 * time.Second

// refusalLog rate-limits the log of repeated refusals by key.
type refusalLog struct {
	mu sync.Mutex
	m  map[string]*refusalEnt
}

type refusalEnt struct {
	last       time.Time
	suppressed int
}

// note counts a refusal; ok says whether to log it now, n how many were
// not logged since the last one that was.
func (l *refusalLog) note(key string, now time.Time) (n int, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string]*refusalEnt{}
	}
	e := l.m[key]
	if e == nil {
		if len(l.m) >= 1024 { // bounded: forget everything rather than grow
			clear(l.m)
		}
		l.m[key] = &refusalEnt{last: now}
		return 0, true
	}
	if now.Sub(e.last) < refusalLogEvery {
		e.suppressed++
		return 0, false
	}
	n, e.last, e.suppressed = e.suppressed, now, 0
	return n, true
}

func (rc *rconn) refuse(code, msg string, attrs ...any) {
	rc.log.Warn(EvRefused, append([]any{"code", code, "detail", msg}, attrs...)...)
	rc.send(&Msg{Type: MsgError, Payload: ErrorBody{Code: code, Message: msg}.Encode()})
}

func (r *Receiver) handle(c net.Conn) {
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	mr := NewMsgReader(c)
	m, err := mr.Read()
	if err != nil {
		if err != io.EOF {
			r.log.Warn(EvRefused, "code", CodeProtocol, "detail", err.Error(), "remote", c.RemoteAddr().String())
		}
		return
	}
	rc := &rconn{r: r, c: c, mr: mr, bw: bufio.NewWriter(c), volume: m.Volume, fence: Fence{Epoch: m.Epoch, Session: m.Session}}
	rc.log = r.log.With("volume", m.Volume, "session", m.Session, "epoch", m.Epoch)
	if m.Type != MsgHello {
		rc.refuse(CodeProtocol, "first message must be hello, got "+m.Type.String())
		return
	}
	h, err := DecodeHello(m.Payload)
	if err != nil {
		rc.refuse(CodeProtocol, err.Error())
		return
	}
	if h.TargetServerID != r.cfg.ServerID {
		rc.refuse(CodeWrongServer, fmt.Sprintf("hello for server %q reached server %q", h.TargetServerID, r.cfg.ServerID))
		return
	}
	tgt, ok := r.cfg.Lookup(m.Volume)
	if !ok || tgt.Vol == nil {
		rc.refuse(CodeNoVolume, "no replica volume "+m.Volume)
		return
	}
	// Only the primary the assignment names may open a session: a
	// stranger who read the epoch and the IDs from the master's API is
	// refused here, before it can supersede the live session.
	if tgt.PrimaryID == "" || h.PrimaryID != tgt.PrimaryID {
		rc.refuseHello(CodeWrongPrimary, fmt.Sprintf("hello from %q, the assignment names primary %q", h.PrimaryID, tgt.PrimaryID), h, tgt)
		return
	}
	// Over TLS the connection knows the server ID the peer's certificate
	// names: a Hello claiming another ID is refused.
	if pv, ok := c.(PeerServerIDer); ok {
		id, err := pv.PeerServerID()
		if err != nil {
			rc.refuseHello(CodeWrongPrimary, fmt.Sprintf("hello from %q over a connection without a server certificate: %v", h.PrimaryID, err), h, tgt)
			return
		}
		if id != h.PrimaryID {
			rc.refuseHello(CodeWrongPrimary, fmt.Sprintf("hello from %q over a connection whose certificate names %q", h.PrimaryID, id), h, tgt)
			return
		}
	}
	if m.Epoch < tgt.Epoch || (m.Epoch > tgt.Epoch && r.cfg.Advance == nil) {
		rc.refuse(CodeStaleEpoch, fmt.Sprintf("primary epoch %d, replica epoch %d", m.Epoch, tgt.Epoch), "replica_epoch", tgt.Epoch)
		return
	}
	if m.Epoch > tgt.Epoch {
		// The named primary moved to a newer epoch (an acting-set change):
		// the epoch is persisted before the session is answered.
		nt, err := r.cfg.Advance(m.Volume, m.Epoch, h.PrimaryID)
		switch {
		case errors.Is(err, ErrWrongPrimary):
			rc.refuseHello(CodeWrongPrimary, err.Error(), h, tgt)
			return
		case err != nil:
			rc.refuse(CodeStaleEpoch, fmt.Sprintf("primary epoch %d, replica epoch %d: %v", m.Epoch, tgt.Epoch, err), "replica_epoch", tgt.Epoch)
			return
		case nt.Epoch != m.Epoch || nt.PrimaryID != h.PrimaryID || nt.Vol == nil:
			rc.refuse(CodeStaleEpoch, fmt.Sprintf("primary epoch %d, replica epoch %d", m.Epoch, nt.Epoch), "replica_epoch", nt.Epoch)
			return
		}
		tgt = nt
	}
	if tgt.Dir == "" {
		tgt.Dir = tgt.Vol.Dir()
	}
	if tgt.FS == nil {
		tgt.FS = r.cfg.FS
	}
	rc.tgt = tgt
	v := r.rv(m.Volume)
	rc.rv = v
	v.mu.Lock()
	if old := v.conn; old != nil {
		old.Close() // supersede the previous session
	}
	v.conn, v.session = c, m.Session
	v.mu.Unlock()
	v.run.Lock()
	defer v.run.Unlock()
	defer func() {
		v.mu.Lock()
		if v.conn == c {
			v.conn = nil
		}
		v.mu.Unlock()
	}()
	v.mu.Lock()
	current := v.session == m.Session
	v.mu.Unlock()
	if !current {
		return
	}
	v.install(tgt.Vol)
	rc.log.Info(EvSessionCreated, "primary", h.PrimaryID, "primary_head", h.HeadLSN)
	rc.bcond = sync.NewCond(&rc.bmu)
	go rc.barrierWorker()
	defer rc.stopBarrier()
	defer rc.waitPersist() // no state write of this session outlives it

	resp, err := rc.helloResp(h, m.LSNFrom)
	if err != nil {
		rc.refuse(CodeApply, err.Error())
		return
	}
	if err := rc.send(&Msg{Type: MsgHelloResp, Payload: resp.Encode()}); err != nil {
		return
	}
	err = rc.loop()
	if err != nil && !errors.Is(err, net.ErrClosed) && err != io.EOF {
		rc.log.Info(EvSessionEnded, "reason", err.Error())
	}
}

// helloResp answers h; feats are the Hello frame's feature bits.
func (rc *rconn) helloResp(h Hello, feats uint64) (HelloResp, error) {
	vol := rc.tgt.Vol
	resp := HelloResp{FlushedLSN: vol.DurableLSN(), HeadLSN: vol.HeadLSN()}
	if feats&HelloFeatSnapshots != 0 {
		resp.SnapshotsKnown, resp.Snapshots = true, snapRefs(vol.Snapshots())
	}
	st, err := rc.loadState()
	if err != nil {
		return resp, err
	}
	if st != nil {
		// An interrupted transfer: resumable by a primary of the same epoch.
		if st.Epoch == rc.fence.Epoch && st.ResetDone && vol.HeadLSN() >= st.ResetLSN {
			resp.HasPending = true
			resp.Pending = Pending{Session: st.Session, Epoch: st.Epoch, Kind: st.Kind, ResetLSN: st.ResetLSN,
				Progress: st.Progress, All: st.All, Regions: st.Regions}
		}
		resp.Untrusted = true
		return resp, nil
	}
	resp.Blank = resp.HeadLSN == 0 && resp.FlushedLSN == 0
	// Find the fork: the first record beyond the primary's head, or, when
	// this replica's last records came from an older epoch, the primary's
	// epoch start (everything the primary wrote from there on is its own,
	// so the replica's records there are not).
	var fork uint64
	if resp.HeadLSN > h.HeadLSN {
		fork = h.HeadLSN + 1
	}
	lin := rc.loadLineage()
	if lin.Epoch != rc.fence.Epoch && h.EpochStartLSN != 0 && resp.HeadLSN >= h.EpochStartLSN && (fork == 0 || h.EpochStartLSN < fork) {
		fork = h.EpochStartLSN
	}
	if fork != 0 {
		resp.ForkLSN = fork
		set := map[uint32]bool{}
		err := vol.ReadRecords(fork, func(rec wal.Record) error {
			if rec.Type == wal.Write || rec.Type == wal.Zero {
				for i := rec.Offset / int64(h.RegionSize); i <= (rec.Offset+int64(rec.Length)-1)/int64(h.RegionSize); i++ {
					set[uint32(i)] = true
				}
			}
			return nil
		})
		if err == nil {
			resp.DivergentKnown = true
			for i := range set {
				resp.Divergent = append(resp.Divergent, i)
			}
			slices.Sort(resp.Divergent)
		} else {
			rc.log.Warn("divergent_tail_unreadable", "from", fork, "head", resp.HeadLSN, "err", err.Error())
		}
		rc.log.Info("fork_found", "fork_lsn", fork, "head", resp.HeadLSN, "primary_head", h.HeadLSN, "epoch_start", h.EpochStartLSN, "regions", len(resp.Divergent))
	}
	return resp, nil
}

// lineage records the epoch whose primary last appended to this replica
// (persisted once per session, before its first record is applied).
type lineage struct {
	Epoch    uint64 `json:"epoch"`
	FirstLSN uint64 `json:"first_lsn"`
}

const lineageFile = "repl-lineage.json"

func (rc *rconn) loadLineage() lineage {
	var l lineage
	if rc.tgt.Dir == "" {
		return l
	}
	p := filepath.Join(rc.tgt.Dir, lineageFile)
	f, err := rc.tgt.FS.OpenFile(p, os.O_RDONLY, 0)
	if err != nil {
		return l
	}
	defer f.Close()
	buf := make([]byte, 256)
	n, _ := f.ReadAt(buf, 0)
	json.Unmarshal(buf[:n], &l)
	return l
}

func (rc *rconn) noteLineage(firstLSN uint64) error {
	if rc.lineageDone || rc.tgt.Dir == "" {
		return nil
	}
	if l := rc.loadLineage(); l.Epoch != rc.fence.Epoch {
		if err := rc.writeFile(lineageFile, lineage{Epoch: rc.fence.Epoch, FirstLSN: firstLSN}); err != nil {
			return err
		}
	}
	rc.lineageDone = true
	return nil
}

// ---- base transfers (rebuild, resync, truncate) on the replica ----

// xferState is persisted in Dir while a transfer is incomplete: the
// replica's image is not trustworthy until MsgDone, and a restart resumes.
type xferState struct {
	Session    uint64       `json:"session"`
	Epoch      uint64       `json:"epoch"`
	Kind       TransferKind `json:"kind"`
	ResetLSN   uint64       `json:"reset_lsn"`
	ResetDone  bool         `json:"reset_done"`
	RegionSize uint32       `json:"region_size"`
	All        bool         `json:"all"`
	Regions    []uint32     `json:"regions,omitempty"`
	Progress   int64        `json:"progress"`
}

type rxfer struct {
	st        xferState
	live      *sectorSet
	unsynced  int64
	bytes     int64
	lastDone  int64
	startTime time.Time
	// A resume point being persisted in the background (persistAsync):
	// its result, and the progress it records.
	persisting  chan error
	persistDone int64
}

const stateFile = "repl-transfer.json"

func (rc *rconn) statePath() string {
	if rc.tgt.Dir == "" {
		return ""
	}
	return filepath.Join(rc.tgt.Dir, stateFile)
}

func (rc *rconn) loadState() (*xferState, error) {
	p := rc.statePath()
	if p == "" {
		return nil, nil
	}
	fs := rc.tgt.FS
	f, err := fs.OpenFile(p, os.O_RDONLY, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("replication: open %s: %w", p, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, fi.Size())
	if _, err := f.ReadAt(buf, 0); err != nil && err != io.EOF {
		return nil, fmt.Errorf("replication: read %s: %w", p, err)
	}
	var st xferState
	if err := json.Unmarshal(buf, &st); err != nil {
		// A torn state file still means "transfer incomplete": untrusted.
		return &xferState{}, nil
	}
	return &st, nil
}

func (rc *rconn) saveState(st *xferState) error {
	if rc.statePath() == "" {
		return nil
	}
	return rc.writeFile(stateFile, st)
}

// writeFile replaces Dir/name with v as JSON, durably (write, fsync,
// rename, fsync of the directory).
func (rc *rconn) writeFile(name string, v any) error {
	p := filepath.Join(rc.tgt.Dir, name)
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("replication: encode %s: %w", p, err)
	}
	if err := vfs.WriteFileAtomic(rc.tgt.FS, p, data, 0o644); err != nil {
		return fmt.Errorf("replication: write %s: %w", p, err)
	}
	return nil
}

func (rc *rconn) removeState() error {
	p := rc.statePath()
	if p == "" {
		return nil
	}
	if err := rc.tgt.FS.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("replication: remove %s: %w", p, err)
	}
	return rc.tgt.FS.SyncDir(rc.tgt.Dir)
}

func (rc *rconn) begin(b Begin) error {
	if err := rc.waitPersist(); err != nil {
		return err
	}
	vol := rc.tgt.Vol
	x := &rxfer{live: newSectorSet(vol.Size()), startTime: time.Now()}
	if b.Resume {
		st, err := rc.loadState()
		if err != nil {
			return err
		}
		if st == nil || st.Epoch != rc.fence.Epoch || !st.ResetDone || st.ResetLSN != b.ResetLSN || vol.HeadLSN() < st.ResetLSN {
			return fmt.Errorf("replication: no resumable transfer matching reset LSN %d", b.ResetLSN)
		}
		x.st = *st
		x.st.Session = rc.fence.Session
		// Live records already applied since the reset still win over base data.
		from := max(st.ResetLSN+1, vol.OldestRetainedLSN())
		err = vol.ReadRecords(from, func(rec wal.Record) error {
			if rec.Type == wal.Write || rec.Type == wal.Zero {
				x.live.mark(rec.Offset, int64(rec.Length))
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("replication: resume: scan own WAL from %d: %w", from, err)
		}
		if err := rc.saveState(&x.st); err != nil {
			return err
		}
	} else {
		x.st = xferState{Session: rc.fence.Session, Epoch: rc.fence.Epoch, Kind: b.Kind, ResetLSN: b.ResetLSN,
			RegionSize: b.RegionSize, All: b.AllRegions || b.Kind == TransferRebuild, Regions: b.Regions}
		if err := rc.saveState(&x.st); err != nil {
			return err
		}
		old := vol.HeadLSN()
		rc.rv.reset(b.ResetLSN)
		if err := vol.ReplResetHead(b.ResetLSN); err != nil {
			return fmt.Errorf("replication: reset head to %d: %w", b.ResetLSN, err)
		}
		if b.Kind == TransferTrunc {
			rc.log.Info(EvTruncated, "from", old, "to", b.ResetLSN, "regions", len(b.Regions))
		}
		x.st.ResetDone = true
		if err := rc.saveState(&x.st); err != nil {
			return err
		}
		if err := rc.noteLineage(b.ResetLSN + 1); err != nil {
			return err
		}
	}
	x.lastDone = x.st.Progress
	rc.xfer = x
	rc.log.Info(EvTransferBegun, "kind", x.st.Kind.String(), "reset_lsn", x.st.ResetLSN, "regions", len(x.st.Regions), "all", x.st.All, "resume", b.Resume, "progress", x.st.Progress)
	return nil
}

// progressEvery: base bytes between persisted resume points (a var for tests).
var progressEvery int64 = 64 << 20

func (rc *rconn) base(c BaseChunk) error {
	x := rc.xfer
	if x == nil {
		return fmt.Errorf("replication: base data outside a transfer")
	}
	vol := rc.tgt.Vol
	if err := blockdev.CheckRange(vol.Size(), c.Offset, int64(c.Length), 0); err != nil {
		return fmt.Errorf("replication: base chunk off=%d len=%d: %w", c.Offset, c.Length, err)
	}
	err := x.live.freeRuns(c.Offset, int64(c.Length), func(off, n int64) error {
		if c.Zero {
			return vol.ReplZeroBase(off, n)
		}
		return vol.ReplWriteBase(off, c.Data[off-c.Offset:off-c.Offset+n])
	})
	if err != nil {
		return fmt.Errorf("replication: base write at %d: %w", c.Offset, err)
	}
	x.unsynced += int64(c.Length)
	x.bytes += int64(len(c.Data))
	x.lastDone = max(x.lastDone, c.Done)
	if x.unsynced >= progressEvery {
		return rc.persistAsync()
	}
	return nil
}

// persistAsync persists a resume point (the base data synced, then the
// progress in the state file, then MsgProgress to the primary) in the
// background, so that the replica goes on reading and writing base data
// while the extent's fdatasync of the last progressEvery bytes runs: a
// rebuild then costs about what its disk writes cost, not the transfer
// plus every sync one after the other. The point recorded is
// the progress when it starts (every chunk up to it has been written, so
// the sync, which starts later, covers it); base writes carry on during
// the sync (ReplWriteBase and ReplSyncBase are both I/Os of the volume).
// At most one runs: the next one, MsgDone, a new Begin and the end of the
// session wait for it (waitPersist), and its error fails the session
// there, before anything more is promised.
func (rc *rconn) persistAsync() error {
	x := rc.xfer
	if err := rc.waitPersist(); err != nil {
		return err
	}
	x.unsynced = 0
	if x.lastDone == x.st.Progress {
		return nil
	}
	st := x.st // the goroutine's copy: only Progress differs while it runs
	st.Progress = x.lastDone
	ch := make(chan error, 1)
	x.persisting, x.persistDone = ch, st.Progress
	go func() {
		if err := rc.tgt.Vol.ReplSyncBase(); err != nil {
			ch <- fmt.Errorf("replication: sync base: %w", err)
			return
		}
		if err := rc.saveState(&st); err != nil {
			ch <- err
			return
		}
		ch <- rc.send(&Msg{Type: MsgProgress, LSNTo: uint64(st.Progress)})
	}()
	return nil
}

// waitPersist waits for the background persist of the current transfer,
// if any, and returns its error.
func (rc *rconn) waitPersist() error {
	x := rc.xfer
	if x == nil || x.persisting == nil {
		return nil
	}
	err := <-x.persisting
	x.persisting = nil
	if err == nil {
		x.st.Progress = x.persistDone
	}
	return err
}

func (rc *rconn) done(achieved uint64) error {
	x := rc.xfer
	if x == nil {
		return fmt.Errorf("replication: done outside a transfer")
	}
	if err := rc.waitPersist(); err != nil {
		return err
	}
	vol := rc.tgt.Vol
	if h := vol.HeadLSN(); h < achieved {
		return fmt.Errorf("replication: done at LSN %d but head is %d", achieved, h)
	}
	if achieved < x.st.ResetLSN {
		return fmt.Errorf("replication: achieved LSN %d below target %d", achieved, x.st.ResetLSN)
	}
	if err := vol.Flush(); err != nil {
		return fmt.Errorf("replication: flush at done: %w", err)
	}
	if err := vol.ReplSyncBase(); err != nil {
		return fmt.Errorf("replication: sync base at done: %w", err)
	}
	if err := rc.removeState(); err != nil {
		return err
	}
	rc.xfer = nil
	flushed := vol.DurableLSN()
	rc.log.Info(EvTransferDone, "kind", x.st.Kind.String(), "achieved_lsn", achieved, "target_lsn", x.st.ResetLSN, "flushed", flushed, "base_bytes", x.bytes)
	return rc.send(&Msg{Type: MsgDoneResp, LSNFrom: achieved, LSNTo: flushed})
}
