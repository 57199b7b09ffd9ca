package replication

// Retention: the WAL the primary holds for replicas it expects back, and
// the budgets that release a hold. The primary keeps its holds in the
// volume's hold set (one per replica, one for the dirty-region bitmaps)
// and moves them whenever a replica's progress, state or budget changes;
// the engine's flusher only reads the set and never calls back.

import (
	"time"
)

// Hold IDs in the volume's set. A replica's hold is keyed by its server
// ID under its own prefix, so no replica ID can collide with the bitmap's.
const (
	holdReplicaPrefix = "primary/replica/"
	holdBitmap        = "primary/bitmap"
)

// holdsLocked evaluates every replica's claim on the WAL against the
// retention budget: a claim past it is released (the replica escalates
// to a resync or rebuild, logged) and left out.
func (p *Primary) holdsLocked(now time.Time) []Hold {
	var holds []Hold
	for _, r := range p.reps {
		if r.released || !r.everSynced {
			continue
		}
		h := Hold{ID: holdReplicaPrefix + r.id, FromLSN: r.flushed + 1}
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
		holds = append(holds, Hold{ID: holdBitmap, FromLSN: p.bmThrough.Load() + 1})
	}
	return holds
}

// syncHoldsLocked brings the volume's hold set in line with holdsLocked:
// new and moved holds are set, holds no longer wanted released. The hold
// set is a leaf of the engine: calling it under p.mu cannot cycle.
func (p *Primary) syncHoldsLocked(now time.Time) {
	if p.closed {
		return
	}
	holds := p.holdsLocked(now)
	seen := make(map[string]bool, len(holds))
	for _, h := range holds {
		seen[h.ID] = true
		if old, ok := p.holds[h.ID]; !ok || old != h.FromLSN {
			p.vol.HoldRetention(h.ID, h.FromLSN)
			p.holds[h.ID] = h.FromLSN
		}
	}
	for id := range p.holds {
		if !seen[id] {
			p.vol.ReleaseRetention(id)
			delete(p.holds, id)
		}
	}
}

// releaseHoldsLocked drops every hold of this primary (Close).
func (p *Primary) releaseHoldsLocked() {
	for id := range p.holds {
		p.vol.ReleaseRetention(id)
		delete(p.holds, id)
	}
}

// maintain persists bitmaps and re-evaluates retention budgets
// periodically, so a hold past its budget is released (and the
// escalation logged) even when no replica reports progress.
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
		p.persistBitmaps()
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return
		}
		p.syncHoldsLocked(time.Now())
		p.mu.Unlock()
	}
}
