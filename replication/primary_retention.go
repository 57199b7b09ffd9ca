package replication

// Retention: the WAL floor the primary holds for replicas it expects back,
// and the budgets that release a hold.

import (
	"time"
)

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
