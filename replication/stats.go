package replication

// Counters for monitoring: transfer progress and barrier latency per
// replica, kept in atomics by the sender and receiver goroutines and read
// at scrape time (ReplicaStatus.Progress, ReplicaStatus.Barrier). Nothing
// here imports a monitoring library.

import (
	"sync/atomic"
	"time"
)

// Transfer kinds as reported in TransferProgress.Kind.
const (
	ProgressCatchUp = "catch_up"
	ProgressResync  = "resync"
	ProgressRebuild = "rebuild"
	ProgressTrunc   = "truncate"
)

// TransferProgress is a replica's catch-up, resync or rebuild in flight.
// Base transfers count bytes (DoneBytes of TotalBytes, zero runs
// included); a catch-up counts LSNs (DoneLSN toward TargetLSN, from
// FromLSN) and the WAL bytes sent so far (DoneBytes; TotalBytes 0).
type TransferProgress struct {
	Kind                  string
	DoneBytes, TotalBytes int64
	FromLSN, DoneLSN      uint64
	TargetLSN             uint64
	Started               time.Time
}

// progressGauge is the atomic mirror of the sender's transfer state.
type progressGauge struct {
	kind       atomic.Pointer[string] // nil: none
	done       atomic.Int64
	total      atomic.Int64
	fromLSN    atomic.Uint64
	doneLSN    atomic.Uint64
	targetLSN  atomic.Uint64
	startNanos atomic.Int64
}

func kindName(k TransferKind) string {
	switch k {
	case TransferRebuild:
		return ProgressRebuild
	case TransferResync:
		return ProgressResync
	case TransferTrunc:
		return ProgressTrunc
	}
	return ProgressCatchUp
}

// startBase: a base transfer of nRegions regions of rs bytes (the last
// clipped at size) begins with doneRegions already sent (a resume).
func (g *progressGauge) startBase(k TransferKind, doneRegions, nRegions, rs, size int64) {
	k2 := kindName(k)
	g.total.Store(min(nRegions*rs, max(size, 0)))
	g.setBase(doneRegions, rs)
	g.fromLSN.Store(0)
	g.doneLSN.Store(0)
	g.targetLSN.Store(0)
	g.startNanos.Store(time.Now().UnixNano())
	g.kind.Store(&k2)
}

func (g *progressGauge) setBase(doneRegions, rs int64) {
	g.done.Store(min(doneRegions*rs, g.total.Load()))
}

// catchUp records a catch-up step: LSN sent, toward target. A base
// transfer in flight keeps its kind (its records stream alongside).
func (g *progressGauge) catchUp(sent, target uint64, walBytes int64) {
	if k := g.kind.Load(); k == nil {
		c := ProgressCatchUp
		g.fromLSN.Store(sent)
		g.total.Store(0)
		g.startNanos.Store(time.Now().UnixNano())
		g.kind.Store(&c)
	} else if *k != ProgressCatchUp {
		return
	}
	g.doneLSN.Store(sent)
	if target > g.targetLSN.Load() {
		g.targetLSN.Store(target)
	}
	g.done.Store(walBytes)
}

func (g *progressGauge) clear() { g.kind.Store(nil); g.targetLSN.Store(0) }

func (g *progressGauge) snapshot() *TransferProgress {
	k := g.kind.Load()
	if k == nil {
		return nil
	}
	return &TransferProgress{Kind: *k, DoneBytes: g.done.Load(), TotalBytes: g.total.Load(),
		FromLSN: g.fromLSN.Load(), DoneLSN: g.doneLSN.Load(), TargetLSN: g.targetLSN.Load(),
		Started: time.Unix(0, g.startNanos.Load())}
}

// BarrierBuckets are the upper bounds (seconds) of the barrier-latency
// histogram in BarrierStats.Counts; the last count is everything above.
var BarrierBuckets = [...]float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// BarrierStats is the latency from sending a barrier to the replica's
// answer covering it (one outstanding barrier measured at a time).
type BarrierStats struct {
	Count  uint64
	SumSec float64
	Counts [len(BarrierBuckets) + 1]uint64 // not cumulative
}

type barrierGauge struct {
	lsn    atomic.Uint64 // outstanding measured barrier (0: none)
	sentNs atomic.Int64
	count  atomic.Uint64
	sumNs  atomic.Int64
	counts [len(BarrierBuckets) + 1]atomic.Uint64
}

// sent: a barrier up to lsn went out (measured if none is outstanding).
func (b *barrierGauge) sent(lsn uint64) {
	if b.lsn.Load() == 0 {
		b.sentNs.Store(time.Now().UnixNano())
		b.lsn.Store(lsn)
	}
}

// answered: the replica is durable up to lsn.
func (b *barrierGauge) answered(lsn uint64) {
	want := b.lsn.Load()
	if want == 0 || lsn < want || !b.lsn.CompareAndSwap(want, 0) {
		return
	}
	d := time.Now().UnixNano() - b.sentNs.Load()
	b.count.Add(1)
	b.sumNs.Add(d)
	sec := float64(d) / 1e9
	i := 0
	for i < len(BarrierBuckets) && sec > BarrierBuckets[i] {
		i++
	}
	b.counts[i].Add(1)
}

func (b *barrierGauge) reset() { b.lsn.Store(0) }

func (b *barrierGauge) snapshot() BarrierStats {
	st := BarrierStats{Count: b.count.Load(), SumSec: float64(b.sumNs.Load()) / 1e9}
	for i := range st.Counts {
		st.Counts[i] = b.counts[i].Load()
	}
	return st
}
