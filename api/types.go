// Package api is the master's wire contract: the JSON types exchanged over
// HTTP under /v1/ and a Go client (Client) that finds and follows the raft
// leader among several master addresses. It is a leaf package: the master,
// the volume server and the CLI import it; it imports nothing of blockd.
//
// Endpoints (all JSON; errors are an Error object with a stable Code):
//
//	GET    /v1/status                    StatusResponse (served by any master)
//	POST   /v1/heartbeat                 HeartbeatRequest -> HeartbeatResponse
//	GET    /v1/servers                   []ServerInfo
//	GET    /v1/volumes                   []VolumeInfo
//	POST   /v1/volumes                   CreateVolumeRequest -> VolumeInfo (201)
//	POST   /v1/volumes/plan              CreateVolumeRequest -> PlanResponse (dry run)
//	POST   /v1/volumes/resolve           CreateVolumeRequest -> ResolveResponse (dry run)
//	GET    /v1/volumes/{name}            VolumeInfo
//	DELETE /v1/volumes/{name}            204
//	POST   /v1/volumes/{name}/expand     ExpandRequest -> VolumeInfo (two-phase; 202 while preparing, 409 expand_cancelled)
//	GET    /v1/volumes/{name}/primary    PrimaryInfo
//	GET    /v1/volumes/{name}/preflight  PreflightResponse (read only)
//	POST   /v1/volumes/{name}/promote    PromoteRequest -> PromoteResponse
//	POST   /v1/volumes/{name}/update     UpdateVolumeRequest -> VolumeInfo
//	POST   /v1/raft/join                 JoinRequest (adds a master: non-voter first, voter once caught up)
//	POST   /v1/raft/remove               RemoveRequest (removes a dead master from the configuration)
//
// Only the raft leader acts. A follower answers every request except
// /v1/status with HTTP 307 to the same path on the leader's API address (the
// body is an Error with Code "not_leader" and Leader set), or 503 "not_leader"
// when it knows no leader. Client follows both.
package api

// Durability modes (docs/ARCHITECTURE.md §3 and §4.6).
const (
	DurabilityBestEffort = "best_effort"
	DurabilitySyncAll    = "sync_all"
	DurabilitySyncQuorum = "sync_quorum"
)

// Roles of a server for one volume (docs/ARCHITECTURE.md §4.1). RoleNone in an assignment
// means: this server is not in the volume's set; stop serving it (keep data).
const (
	RolePrimary    = "primary"
	RoleReplica    = "replica"
	RoleRebuilding = "rebuilding"
	RoleNone       = "none"
)

// Replica states (docs/ARCHITECTURE.md §4.5), as reported by a primary for each replica.
const (
	StateDisconnected = "Disconnected"
	StateConnecting   = "Connecting"
	StateCatchingUp   = "CatchingUp"
	StateInSync       = "InSync"
	StateDegraded     = "Degraded"
	StateNeedsRebuild = "NeedsRebuild"
	StateRebuilding   = "Rebuilding"
)

// Volume status values in VolumeInfo.Status (computed by the leader).
const (
	StatusPending     = "pending"      // assignment not yet confirmed by the primary's heartbeat
	StatusHealthy     = "healthy"      // primary confirmed, every replica InSync and in the acting set
	StatusDegraded    = "degraded"     // primary confirmed, some replica not InSync (or unknown)
	StatusFailingOver = "failing_over" // primary lost; waiting for its lease to expire
	StatusUnavailable = "unavailable"  // primary lost and no eligible replica to promote
	StatusFailed      = "failed"       // a server reported it cannot create or open the volume (VolumeInfo.Failure says why)
)

// ---- volumes ----

// CreateVolumeRequest is the body of create, plan and resolve. Zero fields
// are filled from the preset (or the built-in defaults); set fields override it.
type CreateVolumeRequest struct {
	Name      string `json:"name"`
	SizeBytes int64  `json:"size_bytes"`
	BlockSize int    `json:"block_size,omitempty"`
	// RF is the number of copies, the primary's included. 0 = unset: the
	// preset's, or without a preset 2 (1 when a single server is
	// registered). A negative RF is refused.
	RF           int    `json:"rf,omitempty"`
	Durability   string `json:"durability,omitempty"`
	Preset       string `json:"preset,omitempty"`
	WALSizeBytes int64  `json:"wal_size_bytes,omitempty"`
	// MinCopies is the floor of durable copies (the primary's included) a
	// flush needs before it is acknowledged (like Ceph's min_size). 0 = the
	// preset's default.
	MinCopies int `json:"min_copies,omitempty"`
	// RequestID makes create idempotent across retries and leader changes:
	// a create whose name exists with the same RequestID succeeds with the
	// existing volume. Client.CreateVolume fills it when empty.
	RequestID string `json:"request_id,omitempty"`
	// Allow restricts NBD access to the listed client identities (the
	// names in their TLS certificates). Empty: any certificate of the
	// cluster CA (and, without TLS, anyone).
	Allow []AllowEntry `json:"allow,omitempty"`
}

// AllowEntry grants one client identity access to a volume: read-write,
// or read-only.
type AllowEntry struct {
	Client   string `json:"client"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// PrimaryRef names a volume's primary.
type PrimaryRef struct {
	ServerID string `json:"server_id"`
	NBDAddr  string `json:"nbd_addr"`
	Addr     string `json:"addr"` // control/replication address
	// HTTPAddr is the server's admin API (snapshots, images); empty when
	// the server runs without one.
	HTTPAddr string `json:"http_addr"`
}

// ReplicaInfo is one replica of a volume as the master knows it. State and
// FlushedLSN come from the primary's last heartbeat report (the replica's own
// durable LSN when the primary has not reported it).
type ReplicaInfo struct {
	ServerID   string `json:"server_id"`
	Addr       string `json:"addr"`
	State      string `json:"state"`
	FlushedLSN uint64 `json:"flushed_lsn"`
	// InActingSet: the replica is a member of the acting set; only members
	// count for sync_all, sync_quorum and min_copies. A replica outside it
	// is stale: never promoted without --force, recovering until the
	// master adds it back.
	InActingSet bool `json:"in_acting_set"`
	Stale       bool `json:"stale"`
	// Progress is the catch-up, resync or rebuild in flight, as of the
	// primary's last heartbeat (none: omitted).
	Progress *TransferProgress `json:"progress,omitempty"`
}

// VolumeInfo is `blockd volume info NAME -o json`: its field names are a
// contract that scripts rely on (README.md); add fields, never rename them.
type VolumeInfo struct {
	Name         string        `json:"name"`
	ID           uint64        `json:"id"` // incarnation: changes when a name is deleted and re-created
	SizeBytes    int64         `json:"size_bytes"`
	BlockSize    int           `json:"block_size"`
	Epoch        uint64        `json:"epoch"`
	Durability   string        `json:"durability"`
	RF           int           `json:"rf"`
	Preset       string        `json:"preset"`
	Status       string        `json:"status"`
	WALSizeBytes int64         `json:"wal_size_bytes"`
	Primary      PrimaryRef    `json:"primary"`
	Replicas     []ReplicaInfo `json:"replicas"`
	HeadLSN      uint64        `json:"head_lsn"` // primary's last reported head LSN (0 if unknown)
	// MinCopies: a flush is acknowledged only with at least this many
	// durable copies, the primary's included.
	MinCopies int `json:"min_copies"`
	// ActingSet is the primary followed by the replicas that count for
	// durability at this epoch; Stale lists the replicas outside it.
	ActingSet []string `json:"acting_set"`
	Stale     []string `json:"stale"`
	// FlushesOK tells whether a flush can be acknowledged now (the acting
	// set reaches the durability mode and min_copies with InSync
	// members); FlushBlocker says why not when it is false.
	FlushesOK    bool   `json:"flushes_ok"`
	FlushBlocker string `json:"flush_blocker,omitempty"`
	// Failure is set with Status "failed": the server's reported reason.
	Failure string `json:"failure,omitempty"`
	// Allow is the volume's NBD allow list (empty: unrestricted).
	Allow []AllowEntry `json:"allow,omitempty"`
	// Expand is the volume's current or last two-phase expand.
	Expand *ExpandStatus `json:"expand,omitempty"`
	// MemberSizes is each member's size as its own last heartbeat
	// reported it (primary first), with any prepared, uncommitted size.
	MemberSizes []MemberSize `json:"member_sizes,omitempty"`
}

// Error codes of a two-phase expand (409).
const (
	// CodeExpandCancelled: a member failed to prepare an expand or did
	// not answer in time; every member keeps the old size.
	CodeExpandCancelled = "expand_cancelled"
	// CodeExpandBusy: another expand of the volume is preparing.
	CodeExpandBusy = "expand_busy"
)

// Expand phases (ExpandStatus.Phase).
const (
	ExpandPreparing = "preparing" // waiting for every member to prepare
	ExpandCommitted = "committed" // the new size is the volume's size
	ExpandCancelled = "cancelled" // every member drops its prepared size
)

// ExpandStatus is a two-phase expand as the master's registry records it:
// every member of the acting set prepares (grows its extent, keeps the
// size unexposed), then the master commits; a member that fails or does
// not answer in time makes it cancel (Server and Reason say which and why).
type ExpandStatus struct {
	ID        uint64   `json:"id"` // raft index of the request
	FromBytes int64    `json:"from_bytes"`
	SizeBytes int64    `json:"size_bytes"` // the target size
	Phase     string   `json:"phase"`
	Members   []string `json:"members"`            // the primary and the acting set when it started
	Prepared  []string `json:"prepared,omitempty"` // members that reported prepared (leader memory)
	Server    string   `json:"server,omitempty"`   // cancelled: the member that caused it
	Reason    string   `json:"reason,omitempty"`   // cancelled: why
}

// Err is the one-line error of a cancelled expand of volume name (nil
// unless Phase is cancelled).
func (s *ExpandStatus) Err(name string) *Error {
	if s == nil || s.Phase != ExpandCancelled {
		return nil
	}
	return Errorf(CodeExpandCancelled, "expand of %q to %d bytes cancelled: %s; every member keeps %d bytes", name, s.SizeBytes, s.Reason, s.FromBytes)
}

// MemberSize is one member's size as it reported it.
type MemberSize struct {
	ServerID         string `json:"server_id"`
	SizeBytes        int64  `json:"size_bytes"`                   // 0: no report
	PendingSizeBytes int64  `json:"pending_size_bytes,omitempty"` // prepared, not committed
}

// UpdateVolumeRequest changes a volume's policy (POST /v1/volumes/{name}/update).
// Nil fields are left as they are.
type UpdateVolumeRequest struct {
	MinCopies *int `json:"min_copies,omitempty"`
	// Allow replaces the NBD allow list; a pointer to an empty list lifts
	// the restriction.
	Allow *[]AllowEntry `json:"allow,omitempty"`
}

// ExpandRequest grows a volume. Size may only grow.
type ExpandRequest struct {
	SizeBytes int64 `json:"size_bytes"`
}

// PrimaryInfo answers PrimaryOf: where to attach a volume.
type PrimaryInfo struct {
	Volume   string `json:"volume"`
	Epoch    uint64 `json:"epoch"`
	ServerID string `json:"server_id"`
	Addr     string `json:"addr"`
	NBDAddr  string `json:"nbd_addr"`
	// HTTPAddr is the primary's admin API address (api/snapshot.go); empty
	// when it runs without one.
	HTTPAddr string `json:"http_addr"`
}

// ---- plan / resolve ----

// Warning is a non-fatal remark about a request (stable Code).
type Warning struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// ResolvedPolicy is a create request with every field decided.
type ResolvedPolicy struct {
	Preset       string `json:"preset"`
	SizeBytes    int64  `json:"size_bytes"`
	BlockSize    int    `json:"block_size"`
	RF           int    `json:"rf"`
	Durability   string `json:"durability"`
	WALSizeBytes int64  `json:"wal_size_bytes"`
	MinCopies    int    `json:"min_copies"`
}

// ResolveResponse is the dry run of preset resolution. Errors lists what
// would make create fail (as Error objects with stable codes).
type ResolveResponse struct {
	Policy   ResolvedPolicy `json:"policy"`
	Warnings []Warning      `json:"warnings"`
	Errors   []Error        `json:"errors"`
}

// PlacementCandidate is one server considered by placement.
type PlacementCandidate struct {
	ServerID    string `json:"server_id"`
	FreeBytes   int64  `json:"free_bytes"`
	VolumeCount int    `json:"volume_count"`
	Selected    bool   `json:"selected"`
	Rejection   string `json:"rejection,omitempty"` // stable reason: not_alive, insufficient_capacity
	// Reason is Rejection with its figures, for people
	// ("insufficient_capacity: 1.1 GiB (size 1.0 GiB + WAL 64 MiB) > 512 MiB free to provision ...").
	Reason string `json:"reason,omitempty"`
}

// PlanResponse is the dry run of create: resolution plus placement.
type PlanResponse struct {
	Policy     ResolvedPolicy       `json:"policy"`
	Primary    string               `json:"primary"`
	Replicas   []string             `json:"replicas"`
	Candidates []PlacementCandidate `json:"candidates"`
	Warnings   []Warning            `json:"warnings"`
	Errors     []Error              `json:"errors"`
}

// ---- preflight / promote ----

// Rejection reasons of promotion candidates (stable strings). Hard reasons
// cannot be bypassed by force; soft ones can.
const (
	// hard
	ReasonNotAReplica       = "not_a_replica"
	ReasonIsPrimary         = "is_primary"
	ReasonServerUnknown     = "server_unknown"
	ReasonNoHeartbeat       = "no_heartbeat"
	ReasonHeartbeatStale    = "heartbeat_stale"
	ReasonVolumeNotReported = "volume_not_reported"
	ReasonWrongRole         = "wrong_role"
	ReasonNeedsRebuild      = "replica_needs_rebuild"
	ReasonVolumeIDMismatch  = "volume_id_mismatch"
	// soft
	ReasonStale           = "stale" // outside the acting set: may lack acknowledged writes
	ReasonStaleEpoch      = "stale_epoch"
	ReasonNotInSync       = "not_in_sync"
	ReasonLagExceeded     = "lag_exceeded"
	ReasonLowerFlushedLSN = "lower_flushed_lsn"
	ReasonPrimaryAlive    = "primary_alive" // volume level: the primary still holds a lease
)

// Candidate is one replica evaluated for promotion.
type Candidate struct {
	ServerID   string   `json:"server_id"`
	Eligible   bool     `json:"eligible"`  // no reasons at all: automatic failover may pick it
	Forceable  bool     `json:"forceable"` // only soft reasons: promote --force may pick it
	FlushedLSN uint64   `json:"flushed_lsn"`
	Role       string   `json:"role"`
	Epoch      uint64   `json:"epoch"`
	State      string   `json:"state"` // as reported by the primary
	Reasons    []string `json:"reasons"`
}

// PreflightResponse is the read-only answer to "could this volume be promoted now?".
type PreflightResponse struct {
	Volume         string      `json:"volume"`
	Epoch          uint64      `json:"epoch"`
	Primary        string      `json:"primary"`
	PrimaryAlive   bool        `json:"primary_alive"`
	LeaseExpiresMS int64       `json:"lease_expires_in_ms"` // >0: the primary's lease may still be live that long
	Best           string      `json:"best"`                // the candidate automatic failover would choose ("" if none)
	Candidates     []Candidate `json:"candidates"`
	Blockers       []string    `json:"blockers"` // volume-level reasons (primary_alive)
}

// PromoteRequest asks to make Target (or the best candidate) the primary.
type PromoteRequest struct {
	Target string `json:"target,omitempty"`
	Force  bool   `json:"force,omitempty"`
	// Epoch, when non-zero, must equal the volume's current epoch (409 epoch_changed otherwise).
	Epoch uint64 `json:"epoch,omitempty"`
}

// PromoteResponse reports a promotion.
type PromoteResponse struct {
	Volume      string   `json:"volume"`
	OldPrimary  string   `json:"old_primary"`
	NewPrimary  string   `json:"new_primary"`
	Epoch       uint64   `json:"epoch"`
	Bypassed    []string `json:"bypassed,omitempty"` // soft reasons bypassed by force
	LeaseWaitMS int64    `json:"lease_wait_ms"`      // the new primary gets no lease before this
}

// ---- servers and heartbeats ----

// HeartbeatReplica is a primary's view of one of its replicas.
type HeartbeatReplica struct {
	ServerID   string `json:"server_id"`
	State      string `json:"state"`
	FlushedLSN uint64 `json:"flushed_lsn"`
	// Progress is the catch-up, resync or rebuild in flight (none: nil).
	Progress *TransferProgress `json:"progress,omitempty"`
}

// TransferProgress is a replica's catch-up, resync or rebuild in flight,
// as its primary reports it. A base transfer (resync, rebuild) counts
// bytes; a catch-up counts LSNs (DoneLSN toward TargetLSN) and the WAL
// bytes sent (DoneBytes, TotalBytes 0).
type TransferProgress struct {
	Kind       string `json:"kind"` // catch_up, resync, rebuild, truncate
	DoneBytes  int64  `json:"done_bytes"`
	TotalBytes int64  `json:"total_bytes"`
	FromLSN    uint64 `json:"from_lsn,omitempty"`
	DoneLSN    uint64 `json:"done_lsn,omitempty"`
	TargetLSN  uint64 `json:"target_lsn,omitempty"`
	ElapsedMS  int64  `json:"elapsed_ms"`
}

// HeartbeatVolume is one volume a server hosts, as it reports it.
type HeartbeatVolume struct {
	Name          string             `json:"name"`
	ID            uint64             `json:"id,omitempty"` // VolumeAssignment.ID the server was given (0 = unknown)
	Role          string             `json:"role"`
	Epoch         uint64             `json:"epoch"`
	HeadLSN       uint64             `json:"head_lsn"`
	CheckpointLSN uint64             `json:"checkpoint_lsn"`
	DurableLSN    uint64             `json:"durable_lsn"`        // local FlushedLSN (covered by fdatasync)
	Replicas      []HeartbeatReplica `json:"replicas,omitempty"` // primary only
	// SizeBytes is the volume's committed size here; PendingSizeBytes a
	// size prepared for expand ExpandID and not yet committed (0: none);
	// ExpandError why preparing ExpandID failed.
	SizeBytes        int64  `json:"size_bytes,omitempty"`
	PendingSizeBytes int64  `json:"pending_size_bytes,omitempty"`
	ExpandID         uint64 `json:"expand_id,omitempty"`
	ExpandError      string `json:"expand_error,omitempty"`
}

// HeartbeatRequest is what a volume server sends every HeartbeatIntervalMS.
type HeartbeatRequest struct {
	ServerID string `json:"server_id"`
	Addr     string `json:"addr"` // control/replication address (host:port); an empty host is filled with the caller's IP
	NBDAddr  string `json:"nbd_addr"`
	// HTTPAddr is the server's admin API address (empty: none); an empty
	// host is filled with the caller's IP like Addr's.
	HTTPAddr      string            `json:"http_addr,omitempty"`
	CapacityBytes int64             `json:"capacity_bytes"`
	FreeBytes     int64             `json:"free_bytes"`
	Volumes       []HeartbeatVolume `json:"volumes"`
	// Failures lists assigned volumes this server cannot create or open
	// (for example: no space for the WAL). The master marks them failed.
	Failures []VolumeFailure `json:"failures,omitempty"`
}

// VolumeFailure is a server's report that it cannot host an assigned volume.
type VolumeFailure struct {
	Volume string `json:"volume"`
	ID     uint64 `json:"id"`
	Reason string `json:"reason"`
}

// ServerRef is a server in an assignment.
type ServerRef struct {
	ServerID string `json:"server_id"`
	Addr     string `json:"addr"`
	NBDAddr  string `json:"nbd_addr,omitempty"`
	HTTPAddr string `json:"http_addr,omitempty"`
}

// VolumeAssignment is the master's desired state of one volume on the
// heartbeating server. Every heartbeat reply carries the assignments of every
// volume the server belongs to (it is repeated until, and after, a heartbeat
// confirms it by reporting the same role and epoch).
type VolumeAssignment struct {
	Volume       string `json:"volume"`
	ID           uint64 `json:"id"` // volume incarnation; report it back in HeartbeatVolume.ID
	SizeBytes    int64  `json:"size_bytes"`
	BlockSize    int    `json:"block_size"`
	WALSizeBytes int64  `json:"wal_size_bytes"`
	Durability   string `json:"durability"`
	Role         string `json:"role"` // primary | replica | none
	Epoch        uint64 `json:"epoch"`
	// LeaseTTLMS > 0 only for the primary: it may accept writes for this
	// epoch until (time it SENT this heartbeat) + LeaseTTLMS. 0 = no lease:
	// do not accept writes (e.g. right after a promotion while the old
	// primary's lease may still be live).
	LeaseTTLMS int64       `json:"lease_ttl_ms"`
	Primary    ServerRef   `json:"primary"`
	Replicas   []ServerRef `json:"replicas"`
	// ActingSet lists the IDs of the replicas (a subset of Replicas) that
	// count for sync_all, sync_quorum and min_copies at this epoch. The
	// primary ships to every replica but counts only these; it never
	// drops a member on its own.
	ActingSet []string `json:"acting_set"`
	// MinCopies: durable copies, the primary's included, that a flush needs.
	MinCopies int  `json:"min_copies"`
	Confirmed bool `json:"confirmed"` // this heartbeat reported exactly this role and epoch
	// Allow is the volume's NBD allow list, checked by the primary at
	// NBD_OPT_GO against the client certificate's name. Empty:
	// unrestricted (a master older than the field sends none).
	Allow []AllowEntry `json:"allow,omitempty"`
	// ExpandID/ExpandSizeBytes: a two-phase expand is preparing: grow to
	// ExpandSizeBytes without exposing it and report it prepared. Absent:
	// drop any prepared size that is not SizeBytes. SizeBytes above the
	// size here commits it (or, never prepared, grows in one step).
	ExpandID        uint64 `json:"expand_id,omitempty"`
	ExpandSizeBytes int64  `json:"expand_size_bytes,omitempty"`
}

// HeartbeatResponse is the master's reply to a heartbeat.
type HeartbeatResponse struct {
	LeaseTTLMS          int64              `json:"lease_ttl_ms"`
	HeartbeatIntervalMS int64              `json:"heartbeat_interval_ms"` // send the next heartbeat within this
	Assignments         []VolumeAssignment `json:"assignments"`
	// Drop lists volumes the server reported that were deleted (or belong to
	// an older incarnation of the name): stop serving them and delete their data.
	Drop []string `json:"drop"`
}

// ServerInfo is one registered volume server.
type ServerInfo struct {
	ServerID        string `json:"server_id"`
	Addr            string `json:"addr"`
	NBDAddr         string `json:"nbd_addr"`
	CapacityBytes   int64  `json:"capacity_bytes"`
	FreeBytes       int64  `json:"free_bytes"`
	Alive           bool   `json:"alive"`
	LastHeartbeatMS int64  `json:"last_heartbeat_ms_ago"` // -1: none since this leader started
	Volumes         int    `json:"volumes"`
}

// ---- masters ----

// StatusResponse describes one master.
type StatusResponse struct {
	ID       string   `json:"id"` // the master's API address (its raft server ID)
	State    string   `json:"state"`
	IsLeader bool     `json:"is_leader"`
	Leader   string   `json:"leader"` // leader's API address ("" if unknown)
	Peers    []string `json:"peers"`
	Term     uint64   `json:"term"`
	Applied  uint64   `json:"applied_index"`
}

// JoinRequest adds a master (ID = its API address) to the raft cluster.
type JoinRequest struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
}

// RemoveRequest removes a master (ID = its API address) from the raft
// configuration: the way an operator retires a dead voter.
type RemoveRequest struct {
	ID string `json:"id"`
}
