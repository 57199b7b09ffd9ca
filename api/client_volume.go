package api

import (
	"context"
	"net/http"
)

// UpdateVolume changes a volume's policy (POST /v1/volumes/{name}/update);
// nil fields of req are left as they are.
func (c *Client) UpdateVolume(ctx context.Context, name string, req UpdateVolumeRequest) (*VolumeInfo, error) {
	var out VolumeInfo
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(name)+"/update", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}
