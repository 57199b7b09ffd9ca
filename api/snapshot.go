package api

import (
	"context"
	"net/http"
	"time"
)

// The volume server's admin API (every server's --http address; `blockd
// serve` mounts it on its API listener). Its routes live under /v1/server/
// so they never clash with the master's:
//
//	POST   /v1/server/volumes/{name}/snapshots                CreateSnapshotRequest -> SnapshotInfo (201)
//	GET    /v1/server/volumes/{name}/snapshots                []SnapshotInfo, oldest first
//	DELETE /v1/server/volumes/{name}/snapshots/{snap}         204
//	POST   /v1/server/volumes/{name}/snapshots/{snap}/restore SnapshotInfo
//
// Only the volume's primary, holding a live lease, answers them; any other
// server answers 409 not_primary with Error.Primary naming the primary as
// that server last heard it. A client asks the master for the primary's
// HTTPAddr (PrimaryOf) and then calls it directly with NewClient (or
// NewClientTLS) of that one address.

// SnapshotInfo is one snapshot as the server API and `blockd snapshot list
// -o json` print it: name, created, lsn and size_bytes are a contract.
type SnapshotInfo struct {
	Name    string    `json:"name"`
	Created time.Time `json:"created"`
	// LSN of the snapshot's record: it holds every write before it.
	LSN       uint64 `json:"lsn"`
	SizeBytes int64  `json:"size_bytes"`
	ID        uint64 `json:"id"`
	UUID      string `json:"uuid"`
	// HeldBytes is the space the snapshot's preserved blocks take.
	HeldBytes int64 `json:"held_bytes"`
	// Volume and Epoch say which volume and which primary epoch answered.
	Volume string `json:"volume,omitempty"`
	Epoch  uint64 `json:"epoch,omitempty"`
}

// CreateSnapshotRequest is the body of a snapshot create.
type CreateSnapshotRequest struct {
	Name string `json:"name"`
}

// CreateSnapshot asks the volume's primary (c's address) for a snapshot.
// It returns once the snapshot is durable per the volume's durability mode.
func (c *Client) CreateSnapshot(ctx context.Context, volume, snap string) (*SnapshotInfo, error) {
	var out SnapshotInfo
	if err := c.do(ctx, http.MethodPost, "/v1/server/volumes/"+esc(volume)+"/snapshots", CreateSnapshotRequest{Name: snap}, &out, false); err != nil {
		return nil, err
	}
	return &out, nil
}

// ListSnapshots lists the volume's snapshots, oldest first.
func (c *Client) ListSnapshots(ctx context.Context, volume string) ([]SnapshotInfo, error) {
	var out []SnapshotInfo
	if err := c.do(ctx, http.MethodGet, "/v1/server/volumes/"+esc(volume)+"/snapshots", nil, &out, true); err != nil {
		return nil, err
	}
	if out == nil {
		out = []SnapshotInfo{}
	}
	return out, nil
}

// DeleteSnapshot deletes one snapshot.
func (c *Client) DeleteSnapshot(ctx context.Context, volume, snap string) error {
	return c.do(ctx, http.MethodDelete, "/v1/server/volumes/"+esc(volume)+"/snapshots/"+esc(snap), nil, nil, false)
}

// RestoreSnapshot reverts the volume to the snapshot (which stays).
func (c *Client) RestoreSnapshot(ctx context.Context, volume, snap string) (*SnapshotInfo, error) {
	var out SnapshotInfo
	if err := c.do(ctx, http.MethodPost, "/v1/server/volumes/"+esc(volume)+"/snapshots/"+esc(snap)+"/restore", nil, &out, false); err != nil {
		return nil, err
	}
	return &out, nil
}
