package blockvol

import "sync/atomic"

// Engine counters for monitoring. The engine keeps plain atomic counters
// (a few increments on the append and sync paths); the server turns them
// into Prometheus metrics at scrape time, so blockvol imports nothing of
// monitoring.

// BatchBuckets are the upper bounds of the group-commit batch-size
// histogram in Stats.BatchCounts: how many records one WAL fdatasync made
// durable. The last count (index len(BatchBuckets)) is everything above.
var BatchBuckets = [...]uint64{1, 2, 4, 8, 16, 32, 64, 128, 256}

// engineStats is embedded in Volume.
type engineStats struct {
	backPressureWaits atomic.Uint64 // appends that waited for WAL space
	syncs             atomic.Uint64 // WAL fdatasyncs that made records durable
	syncedRecords     atomic.Uint64 // records those syncs made durable
	batch             [len(BatchBuckets) + 1]atomic.Uint64
	redirectWrites    atomic.Uint64 // large writes written once (redirect.go)
	redirectBytes     atomic.Uint64
	redirectDirect    atomic.Uint64 // of those bytes, written around the page cache
	redirectSettles   atomic.Uint64 // DurableLSN persisted for a small write after a redirect
}

// observeBatch records one group commit that made n records durable.
func (s *engineStats) observeBatch(n uint64) {
	s.syncs.Add(1)
	s.syncedRecords.Add(n)
	i := 0
	for i < len(BatchBuckets) && n > BatchBuckets[i] {
		i++
	}
	s.batch[i].Add(1)
}

// Stats is a snapshot of a volume's engine counters and gauges.
type Stats struct {
	HeadLSN, DurableLSN, CheckpointLSN uint64
	// WALUsedBytes is the log between the oldest retained record and the
	// last completed one (what the flusher and retention holds keep);
	// WALSizeBytes is the log's capacity.
	WALUsedBytes, WALSizeBytes int64
	// BackPressureWaits counts appends that had to wait for log space.
	BackPressureWaits uint64
	// GroupCommits counts WAL fdatasyncs that made records durable, and
	// GroupCommitRecords the records they covered (their ratio is the
	// mean batch size); BatchCounts is the histogram over BatchBuckets
	// (not cumulative).
	GroupCommits, GroupCommitRecords uint64
	BatchCounts                      [len(BatchBuckets) + 1]uint64
	// RedirectWrites and RedirectBytes count large writes whose data was
	// written once, outside the WAL; RedirectSettles the times a small
	// write into such a chunk had to persist the durable LSN first.
	RedirectWrites, RedirectBytes, RedirectSettles uint64
	// RedirectDirectBytes: of RedirectBytes, those written around the page
	// cache (O_DIRECT; the others went through it: the filesystem or the
	// buffer did not allow a direct write).
	RedirectDirectBytes uint64
}

// FlusherLag is how many LSNs the flusher has yet to checkpoint.
func (s Stats) FlusherLag() uint64 {
	if s.HeadLSN < s.CheckpointLSN {
		return 0
	}
	return s.HeadLSN - s.CheckpointLSN
}

// Stats reads the counters; it takes no lock that I/O holds for long.
func (v *Volume) Stats() Stats {
	_, end := v.comp.get()
	used := int64(end) - int64(v.tailPos.Load())
	if used < 0 {
		used = 0
	}
	st := Stats{
		HeadLSN: v.headLSN.Load(), DurableLSN: v.durLSN.Load(), CheckpointLSN: v.ckptLSN.Load(),
		WALUsedBytes: min(used, v.walSize), WALSizeBytes: v.walSize,
		BackPressureWaits: v.stats.backPressureWaits.Load(),
		GroupCommits:      v.stats.syncs.Load(), GroupCommitRecords: v.stats.syncedRecords.Load(),
		RedirectWrites: v.stats.redirectWrites.Load(), RedirectBytes: v.stats.redirectBytes.Load(),
		RedirectSettles: v.stats.redirectSettles.Load(), RedirectDirectBytes: v.stats.redirectDirect.Load(),
	}
	for i := range st.BatchCounts {
		st.BatchCounts[i] = v.stats.batch[i].Load()
	}
	return st
}
