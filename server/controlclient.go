package server

// The control socket's wire types and its client (what `blockd attach
// ublk` and `blockd detach` use); the endpoint itself is in control.go.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"time"
)

// ControlSocketName is the control socket's file name in the data directory.
const ControlSocketName = "control.sock"

// UblkRequest is the body of POST /v1/ublk.
type UblkRequest struct {
	Volume string `json:"volume"`
	// ID asks for /dev/ublkb<ID>; nil lets the driver choose.
	ID *int `json:"id,omitempty"`
}

// UblkDevice describes one device the server hosts.
type UblkDevice struct {
	Volume   string `json:"volume"`
	Path     string `json:"path"`
	ID       int    `json:"id"`
	State    string `json:"state,omitempty"` // serving, recovering
	IOErrors int64  `json:"io_errors"`
}

// UblkList is the reply of GET /v1/ublk.
type UblkList struct {
	ServerID string       `json:"server_id"`
	Devices  []UblkDevice `json:"devices"`
}

// ControlError is the error body of every control endpoint, and the
// error ControlClient returns for a reply outside 2xx.
type ControlError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

func (e *ControlError) Error() string { return e.Code + ": " + e.Message }

// ControlCode is the code of a *ControlError in err's chain ("" if none).
func ControlCode(err error) string {
	var ce *ControlError
	if errors.As(err, &ce) {
		return ce.Code
	}
	return ""
}

// ControlClient talks to the control socket of a volume server on this
// host.
type ControlClient struct {
	sock string
	hc   *http.Client
}

// NewControlClient returns a client of the control socket at sock. Each
// call is bounded by its context and by 90 s (creating a device can wait
// for the kernel).
func NewControlClient(sock string) *ControlClient {
	return &ControlClient{sock: sock, hc: &http.Client{Timeout: 90 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}}}
}

// Socket is the path of the control socket.
func (c *ControlClient) Socket() string { return c.sock }

// List returns the server's ID and the ublk devices it hosts.
func (c *ControlClient) List(ctx context.Context) (UblkList, error) {
	var l UblkList
	err := c.do(ctx, http.MethodGet, "/v1/ublk", nil, &l)
	return l, err
}

// AttachUblk asks the server to host a ublk device for req.Volume (or
// returns the one it already hosts).
func (c *ControlClient) AttachUblk(ctx context.Context, req UblkRequest) (UblkDevice, error) {
	var d UblkDevice
	err := c.do(ctx, http.MethodPost, "/v1/ublk", req, &d)
	return d, err
}

// DetachUblk asks the server to remove /dev/ublkb<id>; a mounted device is
// refused (code "mounted") unless force.
func (c *ControlClient) DetachUblk(ctx context.Context, id int, force bool) error {
	path := "/v1/ublk/" + strconv.Itoa(id)
	if force {
		path += "?force=1"
	}
	return c.do(ctx, http.MethodDelete, path, nil, nil)
}

// do sends one request; a reply outside 2xx comes back as *ControlError
// when its body is one.
func (c *ControlClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("control socket %s: encode request: %w", c.sock, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://blockd"+path, body)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", c.sock, err)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", c.sock, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("control socket %s: %w", c.sock, err)
	}
	if resp.StatusCode/100 != 2 {
		ce := &ControlError{}
		if json.Unmarshal(b, ce) != nil || ce.Code == "" {
			return fmt.Errorf("control socket %s: %s: %s", c.sock, resp.Status, bytes.TrimSpace(b))
		}
		return ce
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("control socket %s: bad reply: %w", c.sock, err)
		}
	}
	return nil
}
