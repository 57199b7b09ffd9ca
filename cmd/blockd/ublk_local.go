package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"

	"github.com/blockd/blockd/server"
)

// The client side of the volume server's local control socket
// (server/control.go): `blockd attach ublk` asks a server on this host
// that is the volume's primary to host /dev/ublkbN itself, and `blockd
// detach` asks it to remove a device it hosts.

// defaultControlSockets are tried, in order, when --control is not given:
// `blockd serve`'s default data directory, then the packaged location.
var defaultControlSockets = []string{"./blockd-data/server/" + server.ControlSocketName, "/var/lib/blockd/" + server.ControlSocketName}

// controlSockets lists the sockets to try: --control (or $BLOCKD_CONTROL),
// else the defaults that exist. "none" disables the local path.
func controlSockets(flag string) []string {
	if flag == "" {
		flag = os.Getenv("BLOCKD_CONTROL")
	}
	if flag == "none" {
		return nil
	}
	if flag != "" {
		return []string{flag}
	}
	var out []string
	for _, p := range defaultControlSockets {
		if st, err := os.Stat(p); err == nil && st.Mode()&os.ModeSocket != 0 {
			out = append(out, p)
		}
	}
	return out
}

// controlClient talks HTTP to one control socket.
type controlClient struct {
	sock string
	hc   *http.Client
}

func newControlClient(sock string) *controlClient {
	return &controlClient{sock: sock, hc: &http.Client{Timeout: 90 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}}}
}

// do sends a request; a reply outside 2xx comes back as *server.ControlError.
func (c *controlClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://blockd"+path, body)
	if err != nil {
		return err
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
		ce := &server.ControlError{}
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

func (c *controlClient) list(ctx context.Context) (*server.UblkList, error) {
	var l server.UblkList
	if err := c.do(ctx, http.MethodGet, "/v1/ublk", nil, &l); err != nil {
		return nil, err
	}
	return &l, nil
}

func controlCode(err error) string {
	var ce *server.ControlError
	if errors.As(err, &ce) {
		return ce.Code
	}
	return ""
}

// localServer finds a server on this host by its control socket: the
// first socket that answers, with its server ID.
func localServer(ctx context.Context, flag string) (*controlClient, string, error) {
	var errs []error
	for _, sock := range controlSockets(flag) {
		c := newControlClient(sock)
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		l, err := c.list(lctx)
		cancel()
		if err == nil {
			return c, l.ServerID, nil
		}
		errs = append(errs, err)
	}
	return nil, "", errors.Join(errs...)
}

// ublkDetachHosted removes device id through the control socket of the
// server that hosts it. ok is false when no local server hosts it.
func ublkDetachHosted(ctx context.Context, id int, force bool) (ok bool, err error) {
	for _, sock := range controlSockets("") {
		c := newControlClient(sock)
		l, err := c.list(ctx)
		if err != nil {
			continue
		}
		for _, d := range l.Devices {
			if d.ID != id {
				continue
			}
			q := ""
			if force {
				q = "?force=1"
			}
			if err := c.do(ctx, http.MethodDelete, "/v1/ublk/"+strconv.Itoa(id)+q, nil, nil); err != nil {
				return true, err
			}
			return true, nil
		}
	}
	return false, nil
}
