package replication

// The sender: WAL catch-up, then live records, barriers and pings.

import (
	"errors"
	"fmt"
	"time"

	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/wal"
)

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
		s.r.prog.catchUp(rec.LSN, target, s.walBytes)
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

// live is the steady state of a session.
func (s *session) live() error {
	r, p := s.r, s.r.p
	var zero [baseChunk]byte
	buf := make([]byte, baseHdrLen+baseChunk) // sendBase's; the rest use buf[baseHdrLen:]
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
			// After any transfer the replica is brought to the primary's
			// snapshots; a replica that did not list its own (an older
			// one) is sent them only after a rebuild.
			if !s.snapsSent && (s.replicaSnapsKnown || s.kind == TransferRebuild) {
				if err := s.sendSnapshots(buf[baseHdrLen:], zero[:]); err != nil {
					return err
				}
				s.snapsSent = true
			}
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
			r.bar.sent(lsn)
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
