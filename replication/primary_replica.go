package replication

// One replica as the primary sees it: its state machine and the runner
// that keeps a session to it.

import (
	"sync"
	"sync/atomic"
	"time"
)

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
	live        atomic.Bool // mirror of attached, read by the shipper without qmu

	// guarded by p.smu
	bm *dirtyBitmap

	walBytes  atomic.Int64
	baseBytes atomic.Int64

	prog progressGauge // stats.go
	bar  barrierGauge
}

// setStateLocked moves r to a new state, logging the transition. A move
// the state machine does not allow (CanTransition) is refused: it is
// logged as illegal_transition and r keeps its state. It reports whether
// r is now in state to.
func (r *replica) setStateLocked(to ReplicaState, reason string) bool {
	p := r.p
	from := r.state
	if from == to {
		return true
	}
	if !CanTransition(from, to) {
		p.log.Error(EvIllegalTransition, "replica", r.id, "from", from.String(), "to", to.String(), "reason", reason, "session", r.session)
		return false
	}
	r.state = to
	if to != CatchingUp && to != Rebuilding {
		r.prog.clear()
	}
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
	return true
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
	p.syncHoldsLocked(time.Now())
	p.cond.Broadcast()
}

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
