package replication

// One session to a replica: connect, handshake, plan, and the receive
// and ping loops.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/blockdev"
)

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
	next        uint64 // next LSN to send
	barrierSent uint64
	lastBgBar   time.Time
	records     int64
	walStart    time.Time
	walBytes    int64
	kind        TransferKind
	target      uint64
	regions     []uint32 // nil with all=true
	all         bool
	progress    int64 // regions sent
	nRegions    int64
	doneSent    bool
	snapsSent   bool // the transfer's snapshots were sent (snapshot_transfer.go)
	// The replica's snapshots as its HelloResp listed them (known: it
	// did, so it takes a snapshot plan after any transfer).
	replicaSnaps      []SnapRef
	replicaSnapsKnown bool
	allowBarrier      bool
	baseBytes         int64

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
	r.bar.reset() // a barrier of an earlier session is not measured
	defer s.fail(errors.New("session over"))
	s.log.Info(EvSessionCreated, "addr", addr)

	err = s.serve()
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

// serve runs one session after the connection is up: handshake, the
// planner's decision, the plan's start, then the sender. It takes p.mu
// only for short state updates.
func (s *session) serve() error {
	hr, facts, err := s.handshake()
	if err != nil {
		return err
	}
	plan := Decide(facts)
	s.log.Info(EvPlanChosen, "plan", plan.Kind.String(), "reason", plan.Reason, "detail", plan.Detail, "from", plan.From, "to", plan.To,
		"replica_flushed", hr.FlushedLSN, "replica_head", hr.HeadLSN, "primary_head", facts.PrimaryHead, "oldest_retained", facts.OldestRetained)

	go s.recvLoop()
	go s.pinger()
	if err := s.startPlan(plan, hr); err != nil {
		return err
	}
	return s.stream()
}

// handshake sends the Hello, reads the replica's answer and gathers the
// planner's facts (the replica's answer, the primary's WAL, the bitmap and
// any escalation). The answer's FlushedLSN becomes the replica's progress.
func (s *session) handshake() (HelloResp, Facts, error) {
	r, p := s.r, s.r.p
	vol := p.vol
	H, S := vol.HeadLSN(), vol.OldestRetainedLSN()
	p.mu.Lock()
	epochStart := p.epochStart
	p.mu.Unlock()
	if err := s.write(&Msg{Type: MsgHello, LSNFrom: HelloFeatSnapshots, Payload: Hello{PrimaryID: p.cfg.ServerID, TargetServerID: r.id, HeadLSN: H, OldestLSN: S,
		RegionSize: uint32(p.cfg.RegionSize), EpochStartLSN: epochStart}.Encode()}); err != nil {
		return HelloResp{}, Facts{}, err
	}
	if err := s.bw.Flush(); err != nil {
		return HelloResp{}, Facts{}, fmt.Errorf("send hello: %w", err)
	}
	s.conn.SetReadDeadline(time.Now().Add(p.cfg.DeadAfter))
	s.mr = NewMsgReader(s.conn)
	m, err := s.mr.Read()
	if err != nil {
		return HelloResp{}, Facts{}, fmt.Errorf("read hello reply: %w", err)
	}
	s.conn.SetReadDeadline(time.Time{})
	if m.Type == MsgError {
		eb, _ := DecodeErrorBody(m.Payload)
		s.log.Warn(EvRefused, "code", eb.Code, "detail", eb.Message)
		return HelloResp{}, Facts{}, &RemoteError{eb}
	}
	if m.Type != MsgHelloResp || m.Session != s.id || m.Epoch != s.epoch {
		return HelloResp{}, Facts{}, fmt.Errorf("%w: unexpected %s (session %d epoch %d) in handshake", ErrBadFrame, m.Type, m.Session, m.Epoch)
	}
	hr, err := DecodeHelloResp(m.Payload)
	if err != nil {
		return HelloResp{}, Facts{}, err
	}
	s.replicaSnaps, s.replicaSnapsKnown = hr.Snapshots, hr.SnapshotsKnown
	p.smu.Lock()
	bmFrom := r.bm.from()
	p.smu.Unlock()
	p.mu.Lock()
	escalated := r.forceTransfer
	if s.failed() {
		p.mu.Unlock()
		return HelloResp{}, Facts{}, s.err
	}
	r.flushed = hr.FlushedLSN // the handshake is authoritative, not a cached value
	p.syncHoldsLocked(time.Now())
	p.mu.Unlock()
	facts := Facts{ReplicaFlushed: hr.FlushedLSN, ReplicaHead: hr.HeadLSN, PrimaryHead: H, OldestRetained: S,
		Blank: hr.Blank, Trusted: !hr.Untrusted, BitmapOK: true, BitmapFrom: bmFrom, ForkLSN: hr.ForkLSN, DivergentKnown: hr.DivergentKnown,
		HasPending: hr.HasPending, PendingEpoch: hr.Pending.Epoch, PendingKind: hr.Pending.Kind, Epoch: s.epoch, Escalated: escalated}
	return hr, facts, nil
}

// startPlan carries out the start of plan: the state for a catch-up, or
// the Begin of a transfer, and the first LSN the sender streams.
func (s *session) startPlan(plan Plan, hr HelloResp) error {
	r, p := s.r, s.r.p
	switch plan.Kind {
	case PlanInSync, PlanCatchUp:
		s.next = hr.FlushedLSN + 1
		p.mu.Lock()
		r.setStateLocked(CatchingUp, plan.Reason)
		p.mu.Unlock()
		s.allowBarrier = true
	case PlanTruncateThenCatchUp:
		s.kind, s.regions = TransferTrunc, hr.Divergent
		if err := s.begin(Begin{Kind: TransferTrunc, ResetLSN: plan.ResetLSN, RegionSize: uint32(p.cfg.RegionSize), Regions: hr.Divergent}); err != nil {
			return err
		}
		s.next = plan.ResetLSN + 1
	case PlanResync, PlanRebuild:
		// The target is frozen when the transfer begins, at the last
		// record the shipper marked into the bitmaps (read together with
		// the regions): every record up to it is in a region sent, every
		// later one is streamed (the bitmap hold keeps them in the WAL).
		// The base is read once those records are applied locally.
		p.smu.Lock()
		T := p.lastLSN
		b := Begin{Kind: TransferRebuild, ResetLSN: T, RegionSize: uint32(p.cfg.RegionSize), AllRegions: true}
		if plan.Kind == PlanResync {
			b.Kind, b.AllRegions, b.Regions = TransferResync, false, r.bm.regions()
		}
		p.smu.Unlock()
		if err := p.vol.WaitApplied(T); err != nil {
			return fmt.Errorf("begin %s at LSN %d: %w", b.Kind, T, err)
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
	return nil
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
	p.syncHoldsLocked(time.Now())
	p.mu.Unlock()
	r.prog.startBase(b.Kind, s.progress, s.nRegions, p.cfg.RegionSize, p.vol.Size())
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
			s.r.bar.answered(m.LSNTo)
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
