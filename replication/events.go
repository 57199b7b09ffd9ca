package replication

// Stable event names (slog msg). Tests and operators match on these.
const (
	EvSessionCreated    = "session_created"    // replica, session, epoch, addr
	EvSessionEnded      = "session_ended"      // replica, session, reason
	EvPlanChosen        = "plan_chosen"        // replica, session, plan, reason, detail, from, to
	EvPlanCancelled     = "plan_cancelled"     // replica, session, reason
	EvEscalated         = "escalated"          // replica, reason, from_lsn, head_lsn, to
	EvStateChanged      = "state_changed"      // replica, from, to, reason
	EvIllegalTransition = "illegal_transition" // replica, from, to, reason: refused, the state is kept
	EvCatchUpDone       = "catchup_done"       // replica, session, lsn, records
	EvTransferBegun     = "transfer_begun"     // replica, session, kind, reset_lsn, regions
	EvTransferDone      = "transfer_done"      // replica, session, kind, achieved_lsn, bytes
	EvRetentionRelease  = "retention_released" // replica, reason, lsn
	EvEndpointMoved     = "endpoint_moved"     // replica, old_addr, new_addr
	EvReplicaRejected   = "replica_rejected"   // reason (missing server ID ...)
	EvFeedLost          = "record_feed_lost"   // from_lsn, to_lsn: the shipper fell behind; bitmaps restart after to_lsn
	EvFlushFailed       = "flush_failed"       // lsn, mode, rule, reason, missing, acting_set, min_copies, copies, need, waited, detail
	EvActingSet         = "acting_set_applied" // epoch, mode, acting_set, stale, min_copies, legacy (or reason member_not_assigned)
	EvRefused           = "refused"            // replica side: code, epoch, session
	EvTruncated         = "truncated"          // replica side: from, to
	EvBarrier           = "barrier"            // replica side (debug): lsn, flushed
	// Authority (Host): one event per change of a volume's record.
	EvAuthorityChanged       = "authority_changed"        // volume, role, epoch, primary, old_role, old_epoch, old_primary
	EvAuthorityPersistFailed = "authority_persist_failed" // volume, role, epoch, kept_role, kept_epoch, err
	EvEpochAdvanced          = "epoch_advanced"           // replica side: volume, epoch, old_epoch, primary
	EvHelloRefused           = "hello_refused"            // replica side: volume, code, primary, named_primary, epoch, remote
)
