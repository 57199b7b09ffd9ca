package api

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// DefaultMaster is the default master API address (DESIGN.md §8).
const DefaultMaster = "127.0.0.1:9333"

// Client talks to a set of masters and follows the raft leader: it sends to
// the last known leader first, follows 307 redirects and not_leader answers,
// and on transport errors tries the next address, with backoff, until
// RetryFor (or the context) runs out. Safe for concurrent use.
type Client struct {
	addrs []string
	hc    *http.Client

	// RetryFor bounds how long one call keeps trying masters when none
	// answers or none is leader (default 30s). The context bounds it too.
	RetryFor time.Duration

	mu     sync.Mutex
	leader string
}

// NewClient returns a client for the given master API addresses
// ("host:port" or "http://host:port"). An empty list means DefaultMaster.
func NewClient(addrs []string) *Client {
	var norm []string
	for _, a := range addrs {
		if a = strings.TrimSpace(a); a != "" {
			norm = append(norm, normalize(a))
		}
	}
	if len(norm) == 0 {
		norm = []string{normalize(DefaultMaster)}
	}
	return &Client{
		addrs:    norm,
		RetryFor: 30 * time.Second,
		hc: &http.Client{
			Timeout: 15 * time.Second,
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse // we follow ourselves, remembering the leader
			},
		},
	}
}

// ParseAddrs splits "a,b,c" into addresses.
func ParseAddrs(s string) []string {
	var out []string
	for _, a := range strings.Split(s, ",") {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	return out
}

func normalize(a string) string {
	a = strings.TrimRight(a, "/")
	if !strings.Contains(a, "://") {
		a = "http://" + a
	}
	return a
}

// Addrs returns the configured master base URLs.
func (c *Client) Addrs() []string { return append([]string(nil), c.addrs...) }

// Leader returns the base URL of the master last seen as leader ("" if none).
func (c *Client) Leader() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leader
}

// order returns the addresses to try: the known leader first.
func (c *Client) order() []string {
	c.mu.Lock()
	l := c.leader
	c.mu.Unlock()
	out := make([]string, 0, len(c.addrs)+1)
	if l != "" {
		out = append(out, l)
	}
	for _, a := range c.addrs {
		if a != l {
			out = append(out, a)
		}
	}
	return out
}

func (c *Client) setLeader(base string) {
	c.mu.Lock()
	c.leader = base
	c.mu.Unlock()
}

// retrySafe reports whether a transport error proves the request was never
// delivered (so even a non-idempotent call may be retried).
func retrySafe(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	return false
}

// do sends one call. idempotent calls are retried on any transport error;
// others only when the request provably never left (dial errors) or was
// refused with not_leader.
func (c *Client) do(ctx context.Context, method, path string, in, out any, idempotent bool) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("api: encode %s %s: %w", method, path, err)
		}
	}
	deadline := time.Now().Add(c.RetryFor)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	backoff := 50 * time.Millisecond
	var lastErr error
	for {
		for _, base := range c.order() {
			target := base
			for hop := 0; hop < 4; hop++ {
				next, err := c.once(ctx, method, target, path, body, out)
				if err == nil {
					c.setLeader(target)
					return nil
				}
				if ctx.Err() != nil {
					return fmt.Errorf("api: %s %s: %w", method, path, ctx.Err())
				}
				var apiErr *Error
				switch {
				case next != "":
					lastErr = err
					target = next
					continue // follow the redirect to the leader
				case errors.As(err, &apiErr) && apiErr.Code == CodeNotLeader:
					lastErr = err
				case errors.As(err, &apiErr):
					if c.Leader() == "" {
						c.setLeader(target)
					}
					return err // a real answer from the leader
				default: // transport
					lastErr = err
					if !idempotent && !retrySafe(err) {
						return err
					}
					if target == c.Leader() {
						c.setLeader("")
					}
				}
				break
			}
		}
		if time.Now().Add(backoff).After(deadline) {
			if lastErr == nil {
				lastErr = &Error{Code: CodeUnavailable, Message: "no master answered"}
			}
			return fmt.Errorf("api: %s %s: no leader reachable via %s: %w", method, path, strings.Join(c.addrs, ","), lastErr)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("api: %s %s: %w", method, path, ctx.Err())
		case <-time.After(backoff):
		}
		if backoff < time.Second {
			backoff *= 2
		}
	}
}

// once performs a single HTTP exchange with base. It returns the leader's
// base URL to go to next when the answer is a redirect.
func (c *Client) once(ctx context.Context, method, base, path string, body []byte, out any) (string, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, base+path, rd)
	if err != nil {
		return "", fmt.Errorf("api: %s %s%s: %w", method, base, path, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("api: %s %s%s: %w", method, base, path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return "", fmt.Errorf("api: %s %s%s: read reply: %w", method, base, path, err)
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		if out != nil && len(data) > 0 {
			if err := json.Unmarshal(data, out); err != nil {
				return "", &Error{Code: CodeInternal, Message: fmt.Sprintf("decode reply of %s %s: %v", method, path, err), Status: resp.StatusCode}
			}
		}
		return "", nil
	}
	apiErr := &Error{}
	if json.Unmarshal(data, apiErr) != nil || apiErr.Code == "" {
		apiErr = &Error{Code: CodeInternal, Message: strings.TrimSpace(string(data))}
		if apiErr.Message == "" {
			apiErr.Message = resp.Status
		}
	}
	apiErr.Status = resp.StatusCode
	if resp.StatusCode == http.StatusTemporaryRedirect || resp.StatusCode == http.StatusPermanentRedirect {
		if loc := resp.Header.Get("Location"); loc != "" {
			if u, err := url.Parse(loc); err == nil && u.Host != "" {
				return u.Scheme + "://" + u.Host, apiErr
			}
		}
		if apiErr.Leader != "" {
			return normalize(apiErr.Leader), apiErr
		}
	}
	return "", apiErr
}

func esc(name string) string { return url.PathEscape(name) }

// NewRequestID returns a random id for CreateVolumeRequest.RequestID.
func NewRequestID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// CreateVolume creates a volume. Retries (also across a leader change) are
// safe: the request carries a RequestID, filled here when empty.
func (c *Client) CreateVolume(ctx context.Context, req CreateVolumeRequest) (*VolumeInfo, error) {
	if req.RequestID == "" {
		req.RequestID = NewRequestID()
	}
	var out VolumeInfo
	if err := c.do(ctx, http.MethodPost, "/v1/volumes", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// ListVolumes lists every volume, sorted by name.
func (c *Client) ListVolumes(ctx context.Context) ([]VolumeInfo, error) {
	var out []VolumeInfo
	if err := c.do(ctx, http.MethodGet, "/v1/volumes", nil, &out, true); err != nil {
		return nil, err
	}
	return out, nil
}

// VolumeInfo returns one volume.
func (c *Client) VolumeInfo(ctx context.Context, name string) (*VolumeInfo, error) {
	var out VolumeInfo
	if err := c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(name), nil, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// DeleteVolume deletes a volume (code not_found when it does not exist).
func (c *Client) DeleteVolume(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/volumes/"+esc(name), nil, nil, false)
}

// ExpandVolume grows a volume to size bytes (never shrinks; same size is a no-op).
func (c *Client) ExpandVolume(ctx context.Context, name string, size int64) (*VolumeInfo, error) {
	var out VolumeInfo
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(name)+"/expand", ExpandRequest{SizeBytes: size}, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// PlanVolume is the dry run of CreateVolume (resolution and placement).
func (c *Client) PlanVolume(ctx context.Context, req CreateVolumeRequest) (*PlanResponse, error) {
	var out PlanResponse
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/plan", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// ResolveVolume is the dry run of preset resolution.
func (c *Client) ResolveVolume(ctx context.Context, req CreateVolumeRequest) (*ResolveResponse, error) {
	var out ResolveResponse
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/resolve", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// Preflight evaluates every promotion candidate of a volume (read only).
func (c *Client) Preflight(ctx context.Context, name string) (*PreflightResponse, error) {
	var out PreflightResponse
	if err := c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(name)+"/preflight", nil, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// Promote promotes a replica. Not retried after a request may have been
// delivered; set req.Epoch to make a manual retry safe.
func (c *Client) Promote(ctx context.Context, name string, req PromoteRequest) (*PromoteResponse, error) {
	var out PromoteResponse
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(name)+"/promote", req, &out, req.Epoch != 0); err != nil {
		return nil, err
	}
	return &out, nil
}

// PrimaryOf returns where a volume is served (for attach clients). Code
// no_primary when the volume currently has none.
func (c *Client) PrimaryOf(ctx context.Context, name string) (*PrimaryInfo, error) {
	var out PrimaryInfo
	if err := c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(name)+"/primary", nil, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// Heartbeat sends a server heartbeat to the leader. Give it a context whose
// deadline is shorter than the lease TTL.
func (c *Client) Heartbeat(ctx context.Context, req HeartbeatRequest) (*HeartbeatResponse, error) {
	var out HeartbeatResponse
	if err := c.do(ctx, http.MethodPost, "/v1/heartbeat", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// Servers lists the registered volume servers.
func (c *Client) Servers(ctx context.Context) ([]ServerInfo, error) {
	var out []ServerInfo
	if err := c.do(ctx, http.MethodGet, "/v1/servers", nil, &out, true); err != nil {
		return nil, err
	}
	return out, nil
}

// Join asks the cluster's leader to add a master as a voter.
func (c *Client) Join(ctx context.Context, req JoinRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/raft/join", req, nil, true)
}

// Status asks one specific master (base "host:port") about itself, without
// following the leader.
func (c *Client) Status(ctx context.Context, addr string) (*StatusResponse, error) {
	var out StatusResponse
	if _, err := c.once(ctx, http.MethodGet, normalize(addr), "/v1/status", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
