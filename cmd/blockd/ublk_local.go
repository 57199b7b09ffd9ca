package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/blockd/blockd/server"
)

// Finding the volume server on this host for `blockd attach ublk` and
// `blockd detach`; the client of its control socket is
// server.ControlClient.

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

// localServer finds a server on this host by its control socket: the
// first socket that answers, with its server ID.
func localServer(ctx context.Context, flag string) (*server.ControlClient, string, error) {
	var errs []error
	for _, sock := range controlSockets(flag) {
		c := server.NewControlClient(sock)
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		l, err := c.List(lctx)
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
		c := server.NewControlClient(sock)
		l, err := c.List(ctx)
		if err != nil {
			continue
		}
		for _, d := range l.Devices {
			if d.ID == id {
				return true, c.DetachUblk(ctx, id, force)
			}
		}
	}
	return false, nil
}

// ublkRecoveryWait is $BLOCKD_UBLK_RECOVERY_WAIT (a Go duration, e.g.
// 15s) for server.Config.UblkRecoveryWait; unset is 0 (the default).
func ublkRecoveryWait() (time.Duration, error) {
	v := os.Getenv("BLOCKD_UBLK_RECOVERY_WAIT")
	if v == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("bad $BLOCKD_UBLK_RECOVERY_WAIT %q: want a positive duration such as 90s", v)
	}
	return d, nil
}
