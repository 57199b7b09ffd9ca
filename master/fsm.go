package master

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/hashicorp/raft"

	"github.com/blockd/blockd/api"
)

// VolumeRecord is a volume in the raft registry (the source of truth for
// names, sizes, roles and epochs).
type VolumeRecord struct {
	Name         string   `json:"name"`
	ID           uint64   `json:"id"` // raft index of its create: the incarnation
	SizeBytes    int64    `json:"size_bytes"`
	BlockSize    int      `json:"block_size"`
	RF           int      `json:"rf"`
	Durability   string   `json:"durability"`
	Preset       string   `json:"preset"`
	WALSizeBytes int64    `json:"wal_size_bytes"`
	Epoch        uint64   `json:"epoch"`
	Primary      string   `json:"primary"`
	Replicas     []string `json:"replicas"`
	RequestID    string   `json:"request_id,omitempty"`
	// LeaseFenceUnixMS (wall clock, set by a reassign): no primary lease
	// before this, because the previous primary's lease may run until
	// then. Leader memory holds the exact fence; this copy lets a new
	// leader honour it.
	LeaseFenceUnixMS int64 `json:"lease_fence_unix_ms,omitempty"`
	// ActingSet lists the replicas (a subset of Replicas, never the
	// primary) that count for durability at this epoch; the others are
	// stale. A record written before acting sets existed has none (null):
	// that means every replica, and normalize fills it in.
	ActingSet []string `json:"acting_set"`
	// MinCopies is the floor of durable copies (the primary's included) a
	// flush needs. 0 (records older than the field) = DefaultMinCopies.
	MinCopies int `json:"min_copies,omitempty"`
	// Failure is set when a server reported that it cannot create or open
	// the volume; the volume's status is then "failed".
	Failure *VolumeFailureRecord `json:"failure,omitempty"`
	// Allow is the NBD allow list (access.go); empty: unrestricted.
	Allow []api.AllowEntry `json:"allow,omitempty"`
	// Expand is the current or last two-phase expand (expand_fsm.go).
	Expand *ExpandRecord `json:"expand,omitempty"`
}

// VolumeFailureRecord is a server's report that it cannot host a volume.
type VolumeFailureRecord struct {
	Server string `json:"server"`
	Reason string `json:"reason"`
}

// normalize fills what older records lack: an absent acting set is every
// replica; an acting-set member that is no longer a replica is dropped.
func (v *VolumeRecord) normalize() {
	if v.ActingSet == nil {
		v.ActingSet = append([]string{}, v.Replicas...)
		return
	}
	v.ActingSet = intersect(v.ActingSet, v.Replicas)
}

func (v *VolumeRecord) clone() *VolumeRecord {
	c := *v
	c.Replicas = append([]string(nil), v.Replicas...)
	if v.ActingSet != nil {
		c.ActingSet = append([]string{}, v.ActingSet...)
	}
	if v.Failure != nil {
		f := *v.Failure
		c.Failure = &f
	}
	c.Allow = cloneAllow(v.Allow)
	c.Expand = v.Expand.clone()
	c.normalize()
	return &c
}

// inActing reports whether replica id counts for durability.
func (v *VolumeRecord) inActing(id string) bool {
	for _, a := range v.ActingSet {
		if a == id {
			return true
		}
	}
	return false
}

// Stale returns the replicas outside the acting set, in replica order.
func (v *VolumeRecord) Stale() []string {
	out := []string{}
	for _, r := range v.Replicas {
		if !v.inActing(r) {
			out = append(out, r)
		}
	}
	return out
}

// EffectiveMinCopies is MinCopies, or the default for the volume's RF and
// durability when the record predates the field.
func (v *VolumeRecord) EffectiveMinCopies() int {
	if v.MinCopies > 0 {
		return v.MinCopies
	}
	return DefaultMinCopies(v.RF, v.Durability)
}

// intersect returns the members of a that are in b, in a's order, never nil.
func intersect(a, b []string) []string {
	in := map[string]bool{}
	for _, x := range b {
		in[x] = true
	}
	out := []string{}
	for _, x := range a {
		if in[x] {
			out = append(out, x)
			in[x] = false
		}
	}
	return out
}

// Members returns primary then replicas.
func (v *VolumeRecord) Members() []string {
	return append([]string{v.Primary}, v.Replicas...)
}

func (v *VolumeRecord) has(id string) bool {
	for _, m := range v.Members() {
		if m == id {
			return true
		}
	}
	return false
}

// ServerRecord is a volume server's identity and endpoints in the registry.
// Liveness and capacity are leader memory, not raft state.
type ServerRecord struct {
	ID      string `json:"id"`
	Addr    string `json:"addr"`
	NBDAddr string `json:"nbd_addr"`
	// HTTPAddr is the server's admin API (snapshots, images); empty: none.
	HTTPAddr string `json:"http_addr,omitempty"`
}

type fsmState struct {
	Volumes    map[string]*VolumeRecord `json:"volumes"`
	Servers    map[string]*ServerRecord `json:"servers"`
	Tombstones map[string]uint64        `json:"tombstones"` // deleted name -> its last incarnation ID
}

func newState() *fsmState {
	return &fsmState{Volumes: map[string]*VolumeRecord{}, Servers: map[string]*ServerRecord{}, Tombstones: map[string]uint64{}}
}

// command ops
const (
	opCreate       = "create"
	opDelete       = "delete"
	opExpand       = "expand"
	opReassign     = "reassign"
	opUpsertServer = "upsert_server"
	opSetActing    = "set_acting"    // compare-and-set on (ID, ExpectEpoch): new acting set, epoch+1
	opUpdatePolicy = "update_policy" // new MinCopies, epoch+1
	opFail         = "fail"          // a server reported it cannot host the volume
)

type command struct {
	Op     string        `json:"op"`
	Volume *VolumeRecord `json:"volume,omitempty"` // create
	Name   string        `json:"name,omitempty"`
	Size   int64         `json:"size,omitempty"` // expand
	// reassign: compare-and-set on (ID, ExpectEpoch); the epoch becomes ExpectEpoch+1.
	ID          uint64        `json:"id,omitempty"`
	ExpectEpoch uint64        `json:"expect_epoch,omitempty"`
	Primary     string        `json:"primary,omitempty"`
	Replicas    []string      `json:"replicas,omitempty"`
	FenceUnixMS int64         `json:"fence_unix_ms,omitempty"`
	Server      *ServerRecord `json:"server,omitempty"`
	// reassign and set_acting: the acting set after the change (nil in a
	// reassign logged before acting sets existed: every new replica).
	ActingSet []string `json:"acting_set"` // no omitempty: an empty set is not an absent one
	// update_policy
	MinCopies int `json:"min_copies,omitempty"`
	// fail
	Failure *VolumeFailureRecord `json:"failure,omitempty"`
	// set_allow (access.go)
	Allow []api.AllowEntry `json:"allow,omitempty"`
	// expand_prepare (expand_fsm.go)
	Expand *ExpandRecord `json:"expand,omitempty"`
}

type applyResult struct {
	Err *api.Error
	Vol *VolumeRecord
}

// fsm is the raft state machine. Readers get deep copies.
type fsm struct {
	mu sync.RWMutex
	st *fsmState
}

func (f *fsm) Apply(l *raft.Log) any {
	var c command
	if err := json.Unmarshal(l.Data, &c); err != nil {
		return &applyResult{Err: api.Errorf(api.CodeInternal, "decode raft command at index %d: %v", l.Index, err)}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.st.apply(&c, l.Index)
}

// apply is deterministic in (state, command, index).
func (s *fsmState) apply(c *command, index uint64) *applyResult {
	switch c.Op {
	case opCreate:
		v := c.Volume
		if v == nil {
			return &applyResult{Err: api.Errorf(api.CodeBadRequest, "create without volume")}
		}
		if old, ok := s.Volumes[v.Name]; ok {
			if v.RequestID != "" && old.RequestID == v.RequestID {
				return &applyResult{Vol: old.clone()} // a retry of the same create
			}
			return &applyResult{Err: api.Errorf(api.CodeAlreadyExists, "volume %q already exists", v.Name)}
		}
		nv := v.clone()
		nv.ID = index
		nv.Failure = nil
		if nv.Epoch == 0 {
			nv.Epoch = 1
		}
		s.Volumes[nv.Name] = nv
		delete(s.Tombstones, nv.Name)
		return &applyResult{Vol: nv.clone()}
	case opDelete:
		v, ok := s.Volumes[c.Name]
		if !ok {
			return &applyResult{Err: api.Errorf(api.CodeNotFound, "volume %q not found", c.Name)}
		}
		delete(s.Volumes, c.Name)
		s.Tombstones[c.Name] = v.ID
		return &applyResult{Vol: v.clone()}
	case opExpand:
		v, ok := s.Volumes[c.Name]
		if !ok {
			return &applyResult{Err: api.Errorf(api.CodeNotFound, "volume %q not found", c.Name)}
		}
		if c.Size < v.SizeBytes {
			return &applyResult{Err: api.Errorf(api.CodeBadSize, "volume %q is %d bytes; size may only grow (asked %d)", c.Name, v.SizeBytes, c.Size)}
		}
		if c.Size%int64(v.BlockSize) != 0 {
			return &applyResult{Err: api.Errorf(api.CodeBadSize, "size %d is not a multiple of the block size %d", c.Size, v.BlockSize)}
		}
		v.SizeBytes = c.Size
		return &applyResult{Vol: v.clone()}
	case opReassign:
		v, ok := s.Volumes[c.Name]
		if !ok {
			return &applyResult{Err: api.Errorf(api.CodeNotFound, "volume %q not found", c.Name)}
		}
		if v.ID != c.ID || v.Epoch != c.ExpectEpoch {
			return &applyResult{Err: api.Errorf(api.CodeEpochChanged, "volume %q is at id %d epoch %d, expected id %d epoch %d", c.Name, v.ID, v.Epoch, c.ID, c.ExpectEpoch)}
		}
		v.Epoch = c.ExpectEpoch + 1
		v.Primary = c.Primary
		v.Replicas = append([]string{}, c.Replicas...)
		v.LeaseFenceUnixMS = c.FenceUnixMS
		if c.ActingSet != nil {
			v.ActingSet = append([]string{}, c.ActingSet...)
		} else {
			v.ActingSet = nil // an old command: every replica
		}
		v.normalize()
		return &applyResult{Vol: v.clone()}
	case opSetActing:
		v, ok := s.Volumes[c.Name]
		if !ok {
			return &applyResult{Err: api.Errorf(api.CodeNotFound, "volume %q not found", c.Name)}
		}
		if v.ID != c.ID || v.Epoch != c.ExpectEpoch {
			return &applyResult{Err: api.Errorf(api.CodeEpochChanged, "volume %q is at id %d epoch %d, expected id %d epoch %d", c.Name, v.ID, v.Epoch, c.ID, c.ExpectEpoch)}
		}
		for _, a := range c.ActingSet {
			if a == v.Primary || !contains(v.Replicas, a) {
				return &applyResult{Err: api.Errorf(api.CodeBadRequest, "acting set member %q is not a replica of %q", a, c.Name)}
			}
		}
		v.Epoch = c.ExpectEpoch + 1
		v.ActingSet = append([]string{}, c.ActingSet...)
		v.normalize()
		return &applyResult{Vol: v.clone()}
	case opUpdatePolicy:
		v, ok := s.Volumes[c.Name]
		if !ok {
			return &applyResult{Err: api.Errorf(api.CodeNotFound, "volume %q not found", c.Name)}
		}
		if c.ID != 0 && v.ID != c.ID {
			return &applyResult{Err: api.Errorf(api.CodeEpochChanged, "volume %q is incarnation %d, expected %d", c.Name, v.ID, c.ID)}
		}
		if e := ValidateMinCopies(c.MinCopies, v.RF); e != nil {
			return &applyResult{Err: e}
		}
		v.MinCopies = c.MinCopies
		v.Epoch++
		return &applyResult{Vol: v.clone()}
	case opSetAllow:
		return s.applySetAllow(c)
	case opExpandPrepare, opExpandCommit, opExpandCancel:
		return s.applyExpand(c, index)
	case opFail:
		v, ok := s.Volumes[c.Name]
		if !ok {
			return &applyResult{Err: api.Errorf(api.CodeNotFound, "volume %q not found", c.Name)}
		}
		if v.ID != c.ID {
			return &applyResult{Err: api.Errorf(api.CodeEpochChanged, "volume %q is incarnation %d, the failure names %d", c.Name, v.ID, c.ID)}
		}
		v.Failure = nil // nil clears: the server hosts it after all
		if c.Failure != nil {
			f := *c.Failure
			v.Failure = &f
		}
		return &applyResult{Vol: v.clone()}
	case opUpsertServer:
		if c.Server == nil || c.Server.ID == "" {
			return &applyResult{Err: api.Errorf(api.CodeBadRequest, "upsert_server without id")}
		}
		sv := *c.Server
		s.Servers[sv.ID] = &sv
		return &applyResult{}
	}
	return &applyResult{Err: api.Errorf(api.CodeInternal, "unknown raft command %q", c.Op)}
}

func contains(list []string, x string) bool {
	for _, y := range list {
		if y == x {
			return true
		}
	}
	return false
}

func (f *fsm) volume(name string) *VolumeRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if v, ok := f.st.Volumes[name]; ok {
		return v.clone()
	}
	return nil
}

func (f *fsm) volumes() []*VolumeRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]*VolumeRecord, 0, len(f.st.Volumes))
	for _, v := range f.st.Volumes {
		out = append(out, v.clone())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (f *fsm) server(id string) *ServerRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if s, ok := f.st.Servers[id]; ok {
		c := *s
		return &c
	}
	return nil
}

func (f *fsm) servers() []ServerRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]ServerRecord, 0, len(f.st.Servers))
	for _, s := range f.st.Servers {
		out = append(out, *s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func (f *fsm) tombstone(name string) (uint64, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	id, ok := f.st.Tombstones[name]
	return id, ok
}

func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	data, err := json.Marshal(f.st)
	if err != nil {
		return nil, fmt.Errorf("master: snapshot encode: %w", err)
	}
	return &fsmSnapshot{data: data}, nil
}

func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	st := newState()
	if err := json.NewDecoder(rc).Decode(st); err != nil {
		return fmt.Errorf("master: snapshot restore: %w", err)
	}
	if st.Volumes == nil {
		st.Volumes = map[string]*VolumeRecord{}
	}
	if st.Servers == nil {
		st.Servers = map[string]*ServerRecord{}
	}
	if st.Tombstones == nil {
		st.Tombstones = map[string]uint64{}
	}
	for _, v := range st.Volumes {
		v.normalize()
	}
	f.mu.Lock()
	f.st = st
	f.mu.Unlock()
	return nil
}

type fsmSnapshot struct{ data []byte }

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s.data); err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("master: snapshot persist: %w", err)
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}
