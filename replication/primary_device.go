package replication

// The Primary as a blockdev.Device: writes are gated, then go to the
// volume; Flush and FUA writes wait for the durability rule.

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/blockdev"
)

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

func (p *Primary) Size() int64 { return p.vol.Size() }

func (p *Primary) BlockSize() int { return p.vol.BlockSize() }

// ReadAt is gated like a write: once the lease has run out, the master
// may have promoted another server, which may already have acknowledged a
// newer write of the same block. A deposed primary that went on answering
// reads would return the old value (a stale read, found by the torture
// test TestDeposedPrimaryServesNoStaleRead).
func (p *Primary) ReadAt(b []byte, off int64) error {
	if err := p.gate(); err != nil {
		return err
	}
	return p.vol.ReadAt(b, off)
}

// BlockStatus is gated for the same reason as ReadAt: allocation can change
// under a newer primary too.
func (p *Primary) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := p.gate(); err != nil {
		return nil, err
	}
	return p.vol.BlockStatus(off, length)
}

func (p *Primary) WriteAt(b []byte, off int64, fua bool) error {
	if err := p.gate(); err != nil {
		return err
	}
	err := p.vol.WriteAt(b, off, false)
	p.pumpSoon()
	if err != nil {
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
	err := p.vol.Trim(off, length)
	p.pumpSoon()
	return err
}

func (p *Primary) WriteZeroes(off, length int64, punch bool) error {
	if err := p.gate(); err != nil {
		return err
	}
	err := p.vol.WriteZeroes(off, length, punch)
	p.pumpSoon()
	return err
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
	p.pump()               // records up to lsn are in the feed: queue them now
	p.requestBarriers(lsn) // replicas fsync while we do
	t0 := time.Now()
	if err := p.vol.Flush(); err != nil {
		return err
	}
	t1 := time.Now()
	err := p.waitDurable(lsn)
	p.flushTime.add(t1.Sub(t0), time.Since(t1))
	return err
}

// flushTiming splits the flushes' latency (sync): the local fdatasync
// (group commit), then the wait for the durability rule after it (the
// replicas' barrier answers not in yet). Benchmarks read it.
type flushTiming struct {
	n, localNs, waitNs atomic.Int64
}

func (t *flushTiming) add(local, wait time.Duration) {
	t.n.Add(1)
	t.localNs.Add(int64(local))
	t.waitNs.Add(int64(wait))
}

func (p *Primary) requestBarriers(lsn uint64) {
	p.smu.Lock()
	reps := p.shipReps
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
