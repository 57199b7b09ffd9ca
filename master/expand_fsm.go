package master

import (
	"github.com/blockd/blockd/api"
)

// Two-phase expand in the registry. expand_prepare records the intent
// (target size, the members that must prepare); the volume's size does
// not change. expand_commit makes the target the volume's size;
// expand_cancel records why it did not. Both name the intent by its ID
// (the raft index of its expand_prepare), so a decision about an older
// intent can never close a newer one. The legacy one-step "expand" op
// stays as it was, so an old raft log replays the same.
const (
	opExpandPrepare = "expand_prepare"
	opExpandCommit  = "expand_commit"
	opExpandCancel  = "expand_cancel"
)

// ExpandRecord is a volume's current (Phase preparing) or last expand.
type ExpandRecord struct {
	ID        uint64   `json:"id"`
	FromBytes int64    `json:"from_bytes"`
	SizeBytes int64    `json:"size_bytes"`
	Phase     string   `json:"phase"` // api.ExpandPreparing | api.ExpandCommitted | api.ExpandCancelled
	Members   []string `json:"members"`
	// StartedUnixMS is the leader's wall clock when it proposed the
	// intent: a later leader times it out from there.
	StartedUnixMS int64  `json:"started_unix_ms"`
	Server        string `json:"server,omitempty"` // cancel: the member that caused it
	Reason        string `json:"reason,omitempty"`
}

func (e *ExpandRecord) clone() *ExpandRecord {
	if e == nil {
		return nil
	}
	c := *e
	c.Members = append([]string{}, e.Members...)
	return &c
}

// preparing reports whether v has an expand waiting for its members.
func (v *VolumeRecord) preparing() *ExpandRecord {
	if v.Expand != nil && v.Expand.Phase == api.ExpandPreparing {
		return v.Expand
	}
	return nil
}

func (s *fsmState) applyExpand(c *command, index uint64) *applyResult {
	v, ok := s.Volumes[c.Name]
	if !ok {
		return &applyResult{Err: api.Errorf(api.CodeNotFound, "volume %q not found", c.Name)}
	}
	cur := v.preparing()
	switch c.Op {
	case opExpandPrepare:
		if c.Expand == nil {
			return &applyResult{Err: api.Errorf(api.CodeBadRequest, "expand_prepare without an intent")}
		}
		size := c.Expand.SizeBytes
		if cur != nil {
			if cur.SizeBytes == size {
				return &applyResult{Vol: v.clone()} // a retry joins the expand in progress
			}
			return &applyResult{Err: api.Errorf(api.CodeExpandBusy, "volume %q: an expand to %d bytes is preparing (members %v); retry when it ends", c.Name, cur.SizeBytes, cur.Members)}
		}
		switch {
		case size < v.SizeBytes:
			return &applyResult{Err: api.Errorf(api.CodeBadSize, "volume %q is %d bytes; size may only grow (asked %d)", c.Name, v.SizeBytes, size)}
		case size%int64(v.BlockSize) != 0:
			return &applyResult{Err: api.Errorf(api.CodeBadSize, "size %d is not a multiple of the block size %d", size, v.BlockSize)}
		case size == v.SizeBytes:
			return &applyResult{Vol: v.clone()} // nothing to do
		}
		e := c.Expand.clone()
		e.ID, e.FromBytes, e.Phase, e.Server, e.Reason = index, v.SizeBytes, api.ExpandPreparing, "", ""
		v.Expand = e
		return &applyResult{Vol: v.clone()}
	case opExpandCommit, opExpandCancel:
		if cur == nil || cur.ID != c.ID {
			var have uint64
			if cur != nil {
				have = cur.ID
			}
			return &applyResult{Err: api.Errorf(api.CodeEpochChanged, "volume %q: expand %d is not preparing (preparing: %d)", c.Name, c.ID, have)}
		}
		if c.Op == opExpandCommit {
			cur.Phase = api.ExpandCommitted
			if cur.SizeBytes > v.SizeBytes {
				v.SizeBytes = cur.SizeBytes
			}
		} else {
			cur.Phase = api.ExpandCancelled
			if c.Failure != nil {
				cur.Server, cur.Reason = c.Failure.Server, c.Failure.Reason
			}
		}
		return &applyResult{Vol: v.clone()}
	}
	return &applyResult{Err: api.Errorf(api.CodeInternal, "unknown expand op %q", c.Op)}
}
