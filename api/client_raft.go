package api

import (
	"context"
	"net/http"
)

// Error codes of the raft membership endpoints (POST /v1/raft/join and
// POST /v1/raft/remove). The HTTP status is given with each.
const (
	// CodeMemberConflict (409): the join's ID or raft address is already a
	// member's with a different address or ID, or the configuration changed
	// while the request was served (retry).
	CodeMemberConflict = "member_conflict"
	// CodeRaftUnreachable (422): the join's raft address refused or timed
	// out a TCP dial from the leader.
	CodeRaftUnreachable = "raft_addr_unreachable"
	// CodeJoinerUnreachable (422): the joining master's API address (its
	// id) did not answer GET /v1/status from the leader.
	CodeJoinerUnreachable = "joiner_unreachable"
	// CodeJoinerNotFresh (409): the joining master already has raft state
	// (a term, a log, a configuration or a leader of its own); only a master
	// with an empty data directory may join, or another cluster's registry
	// would be overwritten.
	CodeJoinerNotFresh = "joiner_not_fresh"
	// CodeJoinUnsupported (409): the master runs alone on an in-memory raft
	// transport (no raft address) and cannot take members.
	CodeJoinUnsupported = "join_unsupported"
	// CodeRemoveRefused (409): removing that member would remove the leader
	// or the last voter, or leave the remaining voters without a live quorum.
	CodeRemoveRefused = "remove_refused"
)

// Suffrage of a raft member.
const (
	SuffrageVoter    = "voter"
	SuffrageNonvoter = "nonvoter"
)

// RaftMember is one server of the raft configuration.
type RaftMember struct {
	ID       string `json:"id"` // the master's API address
	RaftAddr string `json:"raft_addr"`
	Suffrage string `json:"suffrage"` // SuffrageVoter or SuffrageNonvoter
}

// JoinResponse answers POST /v1/raft/join. A new master is added as a
// non-voter and promoted to voter by the leader once it has caught up;
// repeating the join reports where it stands.
type JoinResponse struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	Suffrage string `json:"suffrage"`
	Message  string `json:"message,omitempty"`
}

// RemoveResponse answers POST /v1/raft/remove with the configuration left.
type RemoveResponse struct {
	ID      string       `json:"id"`
	Members []RaftMember `json:"members"`
}

// JoinMaster asks the leader to add a master (non-voter first, voter once it
// has caught up) and reports its suffrage. Repeating it is safe.
func (c *Client) JoinMaster(ctx context.Context, req JoinRequest) (*JoinResponse, error) {
	var out JoinResponse
	if err := c.do(ctx, http.MethodPost, "/v1/raft/join", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// RemoveMaster asks the leader to remove a (dead) master from the raft
// configuration. It is not retried once sent: a repeat answers not_found.
func (c *Client) RemoveMaster(ctx context.Context, req RemoveRequest) (*RemoveResponse, error) {
	var out RemoveResponse
	if err := c.do(ctx, http.MethodPost, "/v1/raft/remove", req, &out, false); err != nil {
		return nil, err
	}
	return &out, nil
}
