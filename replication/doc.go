// Package replication ships a primary volume's WAL records to its replicas
// and makes FLUSH and FUA mean what the durability mode says (docs/ARCHITECTURE.md §3, §4).
//
// # What the volume server calls
//
// Most servers need only Host, one per volume server:
//
//	h := replication.NewHost(replication.HostConfig{ServerID: id, Logger: log})
//	go h.Serve(replListener)                 // one TCP listener for all replica volumes
//	h.AddVolume(name, vol)                   // every opened *blockvol.Volume
//	h.Apply(replication.Assignment{          // for every assignment in a heartbeat reply
//		Volume: name, Role: replication.RolePrimary, Epoch: e, LeaseUntil: t, PrimaryID: id,
//		Durability: replication.SyncAll, Replicas: []replication.Peer{{ServerID: "s2", Addr: "10.0.0.2:7001"}}})
//	dev, ok := h.Device(name)                // blockdev.Device for NBD/ublk while primary
//	h.Status()                               // []VolumeStatus for the heartbeat (role, epoch, LSNs, replicas)
//	h.RemoveVolume(name); h.Close()
//
// Each volume has one authority record (role, epoch, lease, named
// primary, acting set, min copies). Apply persists the epoch and role
// (blockvol.SetEpochRole, fsync) before it publishes the new record (a
// failed persist keeps the old one, lease revoked), refuses a stale epoch
// (ErrStaleEpoch), then creates, updates or demotes the volume's Primary.
// The record feeds the Receiver's view of which volumes are replicas at
// which epoch and of which primary: a replica accepts a session only
// from the assignment's PrimaryID (others get wrong_primary), and a
// higher epoch only from that primary, persisted before it answers.
// Writes, trims and flushes on the device fail with
// blockdev.ErrNotPrimary unless the record says primary, the superblock
// holds its epoch (or a newer primary one) and the lease (LeaseUntil,
// renewed by re-applying) has not run out; the check takes no lock.
//
// The parts Host is made of can be used directly:
//
//	p, err := NewPrimary(vol, PrimaryConfig{Volume, ServerID, Epoch, Durability, Replicas []Peer, ActingSet, MinCopies, FlushWait, WriteGate func() error, Logger, ...})
//	p.Update(Assignment{Epoch, Durability, Replicas, ActingSet, MinCopies}) error // replicas matched by ServerID
//	p.Replicas() []ReplicaStatus                  // ServerID, Addr, State, FlushedLSN, Session, byte counters
//	p.Close()                                     // does not close the volume
//	r := NewReceiver(ReceiverConfig{ServerID, Lookup: func(volume string) (ReplicaTarget, bool), Logger})
//	r.Serve(ln); r.Close()
//
// The Primary takes records from the volume's record feed
// (blockvol.SubscribeRecords: one Primary per volume) in replication's own
// goroutines: the writer after its write returns, a flush before it asks
// for barriers, a backstop goroutine otherwise. No replication code runs
// under a lock of the engine, and the engine never calls into replication.
//
// *Primary implements blockdev.Device. Flush (and a FUA write) is: ask
// every replica for a barrier, fdatasync locally in parallel, then wait
// until DecideFlush says the durability mode is met, counting only the
// acting set (Assignment.ActingSet): copies are the primary plus the
// members InSync with FlushedLSN ≥ the flush's LSN. sync_all needs every
// member and at least MinCopies copies; sync_quorum needs max(majority of
// RF, MinCopies); best_effort needs MinCopies (default 1). Replicas outside
// the set are shipped to and recovered but never counted, and the primary
// never changes the set itself. A flush the members cannot acknowledge as
// they are (one not InSync, too few) waits up to FlushWait (4 s, restarted
// by a new assignment) for a member to return or for the master to change
// the set, then fails with an error wrapping blockdev.ErrIO (EIO at the
// frontends) that names the rule and the members (flush_failed). Replicas
// report FlushedLSN after their own fdatasync; one barrier answer
// completes every flush it covers. There is no barrier timeout: a replica
// is declared gone only when its connection fails or it answers nothing at
// all (pings are answered without touching the disk) for DeadAfter (30 s).
// A new epoch with the same primary re-Hellos every session at once.
//
// # Identity and authority
//
// A replica is its Peer.ServerID; Addr is only where to reach it. An
// address change moves the endpoint and keeps state, FlushedLSN, bitmap
// and, while healthy, the session. A Peer without ServerID is refused
// (replica_rejected, ErrNoServerID). The Hello names the target server,
// so a reused address that now belongs to another server refuses
// (wrong_server). The Hello also names the primary: a replica accepts it
// only from the primary its own assignment names (wrong_primary,
// hello_refused), so a stranger who read the epoch and the IDs cannot
// supersede the live session. Every message carries the epoch and a
// session ID; the receiver checks both, and the named primary, against
// the server's current assignment on every message, so an old primary's
// records and barriers are refused (stale_epoch) and a late stream of an
// old session cannot apply anything. Every record is validated against
// the volume (blockvol.ValidateRecord, overflow-safe) before it is
// stored.
//
// # Recovery
//
// Each (re)connection is a session: Hello (primary head H, oldest retained
// S, epoch start) → HelloResp (replica FlushedLSN R, head, blank, pending
// transfer, fork LSN and the regions its divergent records touched) →
// Decide (planner.go, a pure function) → one of
//
//	in_sync / catch_up [R+1,H]   stream retained WAL, then live records; a barrier grants InSync
//	truncate_then_catch_up       replica head beyond H, or its records from the new primary's
//	                             epoch start are another epoch's: reset to the fork, restore the
//	                             divergent regions from the primary, catch up
//	resync                       gap older than the WAL: regions from the per-replica dirty bitmap
//	rebuild                      blank or untrusted replica: every region
//	resume                       continue an interrupted rebuild/resync of the same epoch
//
// Transfers reset the replica's log to a frozen target LSN, stream base
// regions interleaved with live records (a live record wins over base data
// for the same sectors), and complete with MsgDone at an explicit achieved
// LSN ≥ target. The replica persists its progress (repl-transfer.json in
// the volume directory) so either side's restart resumes. Catch-up
// escalates to a transfer after 3 failed attempts or a time/byte budget.
// The primary holds WAL for replicas that are expected back (one retention
// hold per replica in the volume's hold set, moved as the replica
// progresses) within a time and byte budget (the byte budget never
// exceeds half the WAL); past it the hold is released and the replica
// escalated.
// Replicas keep the records above the primary's committed LSN (within a
// quarter of their WAL) so a divergent tail can be listed after failover.
//
// Every decision is a structured slog event with a stable name (events.go):
// session_created, plan_chosen{plan,reason,detail,from,to}, escalated
// {reason,from_lsn,head_lsn,to}, plan_cancelled, retention_released,
// state_changed, catchup_done, transfer_begun, transfer_done,
// endpoint_moved, replica_rejected, flush_failed, refused, truncated.
package replication
