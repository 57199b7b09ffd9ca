package api

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// The wire contract of image export and import, served by the volume's
// primary under /v1/server/volumes/{name}/ (the master never carries
// image bytes).

// ImageContentType is the media type of an image stream.
const ImageContentType = "application/x-blockd-image"

// HeaderImageEstimate is the export reply header giving the expected size
// of the image stream in bytes (for a progress bar; not a promise).
const HeaderImageEstimate = "X-Blockd-Image-Estimate"

// Image error codes (the status travels with the error; CodeBusy: another
// import of the volume is running).
const (
	// CodeBadImage (400): the stream is not a valid image (truncated,
	// corrupted, another version); the volume was not changed.
	CodeBadImage = "bad_image"
	// CodeImageConflict (409): a valid image that does not fit the volume
	// (not empty, wrong base, changed since the base, already imported).
	CodeImageConflict = "image_conflict"
	// CodeNoSpace (507): the server ran out of space (staging an import).
	CodeNoSpace = "no_space"
)

// ImportResult is the reply to a successful import.
type ImportResult struct {
	Volume string `json:"volume"`
	// Kind is "full" or "diff".
	Kind string `json:"kind"`
	// ImageBytes is the size of the image stream received.
	ImageBytes  int64  `json:"image_bytes"`
	DataBytes   int64  `json:"data_bytes"`
	ZeroBytes   int64  `json:"zero_bytes"`
	DataRecords int64  `json:"data_records"`
	ZeroRecords int64  `json:"zero_records"`
	Digest      string `json:"digest"`
	// Snapshot is the snapshot the import created from the image's source
	// snapshot (name and UUID as in the image), "" for an image of a live
	// volume.
	Snapshot     string `json:"snapshot,omitempty"`
	SnapshotUUID string `json:"snapshot_uuid,omitempty"`
	Forced       bool   `json:"forced,omitempty"`
}

// ExportImage asks the volume's primary (c's first address) for an image
// stream: of snapshot snap ("" = the live volume, through a temporary
// snapshot), a diff against since when since is set. The caller reads and
// closes the stream; estimate is the server's guess of its size (0 when
// unknown). Errors before the stream starts are *Error.
func (c *Client) ExportImage(ctx context.Context, volume, snap, since string) (stream io.ReadCloser, estimate int64, err error) {
	q := url.Values{}
	if snap != "" {
		q.Set("snap", snap)
	}
	if since != "" {
		q.Set("since", since)
	}
	path := "/v1/server/volumes/" + esc(volume) + "/export"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	resp, err := c.stream(ctx, http.MethodGet, path, nil)
	if err != nil {
		return nil, 0, err
	}
	estimate, _ = strconv.ParseInt(resp.Header.Get(HeaderImageEstimate), 10, 64)
	return resp.Body, estimate, nil
}

// ImportImage sends an image stream to the volume's primary (c's first
// address), which verifies it whole before it changes the volume.
func (c *Client) ImportImage(ctx context.Context, volume string, body io.Reader, force bool) (*ImportResult, error) {
	path := "/v1/server/volumes/" + esc(volume) + "/import"
	if force {
		path += "?force=1"
	}
	resp, err := c.stream(ctx, http.MethodPost, path, body)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out ImportResult
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&out); err != nil {
		return nil, &Error{Code: CodeInternal, Message: fmt.Sprintf("decode reply of import into %s: %v", volume, err), Status: resp.StatusCode}
	}
	return &out, nil
}

// stream makes one request with a streamed body or reply (no retries, no
// answer timeout: images take as long as they take; ctx bounds it). A
// non-2xx reply is returned as *Error.
func (c *Client) stream(ctx context.Context, method, path string, body io.Reader) (*http.Response, error) {
	base := c.order()[0]
	req, err := http.NewRequestWithContext(ctx, method, base+path, body)
	if err != nil {
		return nil, fmt.Errorf("api: %s %s%s: %w", method, base, clip(path), err)
	}
	if body != nil {
		req.Header.Set("Content-Type", ImageContentType)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("api: %s %s%s: %w", method, base, clip(path), unwrapURL(err))
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return resp, nil
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	apiErr := &Error{}
	if json.Unmarshal(data, apiErr) != nil || apiErr.Code == "" {
		msg := fmt.Sprintf("%s answered %s %s with %s", strings.TrimPrefix(strings.TrimPrefix(base, "http://"), "https://"), method, clip(path), resp.Status)
		if b := strings.Join(strings.Fields(string(data)), " "); b != "" {
			msg += ": " + clip(b)
		}
		apiErr = &Error{Code: CodeInternal, Message: msg}
		if strings.Contains(string(data), "HTTP request to an HTTPS server") {
			apiErr = &Error{Code: CodeForbidden, Message: fmt.Sprintf("%s requires TLS: give --tls-cert, --tls-key and --tls-ca (it answered a plain request with %s)",
				strings.TrimPrefix(base, "http://"), resp.Status)}
		}
	}
	apiErr.Status = resp.StatusCode
	return nil, apiErr
}
