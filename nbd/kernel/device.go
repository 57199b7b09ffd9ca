package kernel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/blockd/blockd/nbd/wire"
)

// Options configure Attach.
type Options struct {
	// Volume is the export name and the device's backend identifier, so a
	// reattach can never land on another volume's device.
	Volume string
	// Resolve returns the NBD address (host:port) of the volume's current
	// primary. It is called for the first connection and before every
	// reconnect (after a failover it names the new primary).
	Resolve func(ctx context.Context) (string, error)
	// Connections is the number of TCP connections (default 1); more than
	// one needs the server's CAN_MULTI_CONN.
	Connections int
	// Index picks /dev/nbdN; -1 lets the kernel choose a free one.
	Index int
	// BlockSize is the logical block size given to the kernel (default 4096).
	BlockSize uint64
	// Timeout is the per-request timeout: a request unanswered this long
	// marks its connection dead and is requeued (default 30s).
	Timeout time.Duration
	// Policy decides reconnects and giving up (default DefaultPolicy). Its
	// GiveUp is also the kernel's dead-connection timeout: how long I/O
	// waits for new connections before failing.
	Policy Policy
	// DialTimeout bounds one dial plus handshake (default 10s).
	DialTimeout time.Duration
	// AttachWait is how long Attach retries a primary that does not
	// answer yet or refuses the export (a server still starting, a volume
	// not hosted yet, a failover in progress). 0: one attempt.
	AttachWait time.Duration
	// RetryUnknownExport retries "unknown export" answers within
	// AttachWait too: right when the master vouches that the volume
	// exists (its server may not have picked it up yet). Without it an
	// unknown export fails at once.
	RetryUnknownExport bool
	// TLS, when set, upgrades every connection with NBD_OPT_STARTTLS and
	// hands the kernel a socket proxied through TLS by the keeper
	// (tlsproxy.go); the keeper negotiates TLS again on every reconnect.
	TLS    *tls.Config
	Logger *slog.Logger
}

// Device is an attached /dev/nbdN and its keeper state.
type Device struct {
	Index  int
	Path   string
	Export Export

	o   Options
	nl  *nlConn
	mon *monitor
	log *slog.Logger
	// growTo is a size the server serves and the device does not have
	// yet (a resize that failed after a reconnect); Keep retries it.
	growTo uint64
}

// errPermanent marks errors retrying cannot fix (wrapped with an empty text).
var errPermanent = permanentError{}

type permanentError struct{}

func (permanentError) Error() string { return "" }

// Attach negotiates with the volume's primary and connects a kernel nbd
// device to it. The returned Device must then be kept (Keep) or closed.
func Attach(ctx context.Context, o Options) (*Device, error) {
	if o.Connections <= 0 {
		o.Connections = 1
	}
	if o.BlockSize == 0 {
		o.BlockSize = 4096
	}
	if o.Timeout == 0 {
		o.Timeout = 30 * time.Second
	}
	if o.Policy == (Policy{}) {
		o.Policy = DefaultPolicy
	}
	if o.DialTimeout == 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.Volume == "" {
		return nil, fmt.Errorf("attach: a volume name is needed")
	}
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("attach: %w", ErrNotRoot)
	}
	nl, err := openNBD()
	if err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	d := &Device{o: o, nl: nl, log: o.Logger.With("volume", o.Volume)}
	ok := false
	defer func() {
		if !ok {
			d.close()
		}
	}()
	if o.Index >= 0 {
		exists, connected, err := nl.status(o.Index)
		if err != nil {
			return nil, fmt.Errorf("attach: %w", err)
		}
		if exists && connected {
			return nil, fmt.Errorf("attach: /dev/nbd%d: %w%s", o.Index, ErrBusy, backendOf(o.Index))
		}
	}
	// Subscribe before connecting so no LINK_DEAD is missed.
	if d.mon, err = newMonitor(); err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	var (
		addr  string
		conns []net.Conn
		exp   Export
	)
	giveUp := time.Now().Add(o.AttachWait)
	for attempt := 1; ; attempt++ {
		addr, err = o.Resolve(ctx)
		if err != nil {
			return nil, fmt.Errorf("attach: find the primary of %q: %w", o.Volume, err)
		}
		conns, exp, err = d.dialAll(ctx, addr)
		if err == nil {
			break
		}
		permanent := errors.Is(err, errPermanent) || (errors.Is(err, ErrUnknownExport) && !o.RetryUnknownExport)
		if permanent || time.Now().After(giveUp) {
			return nil, fmt.Errorf("attach: %w", err)
		}
		d.log.Info("nbd_attach_retry", "addr", addr, "attempt", attempt, "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("attach: %w (last error: %v)", ctx.Err(), err)
		case <-time.After(500 * time.Millisecond):
		}
	}
	defer closeAll(conns)
	if exp.Flags&wire.FlagReadOnly != 0 {
		d.log.Warn("nbd_read_only", "addr", addr)
	}
	fds, files, err := socketFDs(conns)
	if err != nil {
		return nil, fmt.Errorf("attach: %w", err)
	}
	defer closeAll(files)
	idx, err := nl.connect(Config{
		Index:       o.Index,
		SizeBytes:   exp.Size,
		BlockSize:   o.BlockSize,
		ServerFlags: exp.Flags,
		Timeout:     o.Timeout,
		DeadConnTO:  o.Policy.GiveUp,
		Backend:     o.Volume,
	}, fds)
	if err != nil {
		if errors.Is(err, ErrBusy) && o.Index >= 0 {
			return nil, fmt.Errorf("attach: /dev/nbd%d: %w", o.Index, err)
		}
		return nil, fmt.Errorf("attach: %w", err)
	}
	d.Index, d.Path, d.Export = idx, fmt.Sprintf("/dev/nbd%d", idx), exp
	d.log = d.log.With("device", d.Path)
	d.log.Info("nbd_attached", "addr", addr, "size", exp.Size, "flags", exp.Flags, "connections", len(conns))
	ok = true
	return d, nil
}

// dialAll opens o.Connections negotiated connections to addr.
func (d *Device) dialAll(ctx context.Context, addr string) ([]net.Conn, Export, error) {
	var conns []net.Conn
	var exp Export
	for i := 0; i < d.o.Connections; i++ {
		dl := time.Now().Add(d.o.DialTimeout)
		dctx, cancel := context.WithDeadline(ctx, dl)
		c, err := (&net.Dialer{}).DialContext(dctx, "tcp", addr)
		cancel()
		if err != nil {
			closeAll(conns)
			return nil, Export{}, fmt.Errorf("dial %s: %w", addr, err)
		}
		nc, e, err := NegotiateTLS(c, d.o.Volume, dl, d.o.TLS)
		if err == nil && d.o.TLS != nil {
			kc, perr := tlsProxy(nc)
			if perr != nil {
				nc.Close()
				closeAll(conns)
				return nil, Export{}, perr
			}
			c = kc
		}
		if err != nil {
			c.Close()
			closeAll(conns)
			if errors.Is(err, ErrUnknownExport) {
				return nil, Export{}, fmt.Errorf("unknown volume %q at %s: %w", d.o.Volume, addr, err)
			}
			return nil, Export{}, fmt.Errorf("%s: %w", addr, err)
		}
		if i == 0 {
			exp = e
			if d.o.Connections > 1 && e.Flags&wire.FlagCanMultiConn == 0 {
				c.Close()
				return nil, Export{}, fmt.Errorf("%s does not allow several connections (no CAN_MULTI_CONN): use --connections 1%w", addr, errPermanent)
			}
		} else if e.Size != exp.Size {
			c.Close()
			closeAll(conns)
			return nil, Export{}, fmt.Errorf("%s: export size changed between connections (%d, %d)", addr, exp.Size, e.Size)
		}
		conns = append(conns, c)
	}
	return conns, exp, nil
}

func socketFDs(conns []net.Conn) ([]int, []*os.File, error) {
	var fds []int
	var files []*os.File
	for _, c := range conns {
		fc, ok := c.(interface{ File() (*os.File, error) })
		if !ok {
			closeAll(files)
			return nil, nil, fmt.Errorf("connection is %T, not a socket", c)
		}
		f, err := fc.File() // a dup; Fd puts it in blocking mode
		if err != nil {
			closeAll(files)
			return nil, nil, fmt.Errorf("socket fd: %w", err)
		}
		files = append(files, f)
		fds = append(fds, int(f.Fd()))
	}
	return fds, files, nil
}

func closeAll[T interface{ Close() error }](cs []T) {
	for _, c := range cs {
		_ = c.Close()
	}
}

// reconnect finds the primary, dials and hands the new sockets to the kernel.
func (d *Device) reconnect(ctx context.Context) error {
	addr, err := d.o.Resolve(ctx)
	if err != nil {
		return fmt.Errorf("find primary: %w", err)
	}
	conns, exp, err := d.dialAll(ctx, addr)
	if err != nil {
		return err
	}
	defer closeAll(conns)
	if exp.Size < d.Export.Size {
		return fmt.Errorf("%s serves %q with %d bytes, the device has %d: refusing to shrink", addr, d.o.Volume, exp.Size, d.Export.Size)
	}
	fds, files, err := socketFDs(conns)
	if err != nil {
		return err
	}
	defer closeAll(files)
	var grow uint64
	if exp.Size > d.Export.Size {
		grow = exp.Size
	}
	// Sockets first, the new size after, in two requests. A resize
	// freezes the device's queue, which waits for every request in
	// flight, and a request sent while the link was dead is waiting for
	// these very sockets (until the dead-connection timeout, minutes):
	// one request carrying both deadlocked the device until that timeout
	// failed the request (seen when a volume grew while a stage was
	// reading the device).
	if err := d.nl.reconfigure(d.Index, d.o.Volume, 0, fds); err != nil {
		return err
	}
	d.log.Info("nbd_reconnected", "addr", addr, "connections", len(conns))
	if grow > 0 {
		d.growTo = grow
		d.grow()
	}
	return nil
}

// grow resizes the device to growTo. A failure leaves it connected at
// its old size; Keep tries again every second.
func (d *Device) grow() {
	if err := d.nl.reconfigure(d.Index, d.o.Volume, d.growTo, nil); err != nil {
		d.log.Warn("nbd_resize_failed", "from", d.Export.Size, "to", d.growTo, "err", err)
		return
	}
	d.log.Info("nbd_resized", "from", d.Export.Size, "to", d.growTo)
	d.Export.Size, d.growTo = d.growTo, 0
}

// Keep stays with the device until it is disconnected (blockd detach, or
// the context ends: then Keep disconnects it), or until the policy gives up
// (then it disconnects the device so that I/O fails instead of hanging, and
// returns an error).
func (d *Device) Keep(ctx context.Context) error {
	defer d.close()
	pid := PidFile(d.Index)
	if err := os.MkdirAll(filepath.Dir(pid), 0o755); err == nil {
		if err := writePidFile(pid); err == nil {
			defer os.Remove(pid)
		}
	}
	var h Health
	p := d.o.Policy
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var retry <-chan time.Time
	act := func(dec Decision) error {
		switch dec.Action {
		case ActGiveUp:
			d.log.Error("nbd_give_up", "down_for", time.Since(h.DownSince).Round(time.Millisecond), "attempts", h.Failures)
			if err := d.nl.disconnect(d.Index); err != nil {
				d.log.Error("nbd_disconnect_failed", "err", err)
			}
			return fmt.Errorf("keeper: %s: gave up after %v without a connection to volume %q", d.Path, p.GiveUp, d.o.Volume)
		case ActReconnect:
			retry = time.After(dec.Delay)
		}
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			if mp := MountedAt(d.Path); mp != "" {
				d.log.Warn("nbd_detach_mounted", "mountpoint", mp, "effect", "the filesystem gets I/O errors")
			}
			d.log.Info("nbd_detach", "reason", "keeper stopped")
			if err := d.nl.disconnect(d.Index); err != nil {
				return err
			}
			return nil
		case idx := <-d.mon.ch:
			if idx != d.Index && idx != -1 {
				continue
			}
			d.log.Warn("nbd_link_dead", "index", idx)
			var dec Decision
			h, dec = p.Step(h, EvLinkDead, time.Now())
			if err := act(dec); err != nil {
				return err
			}
		case <-retry:
			retry = nil
			d.log.Info("nbd_reconnect", "attempt", h.Failures+1)
			// One attempt may not outlive the give-up deadline.
			dl := time.Now().Add(d.o.DialTimeout * time.Duration(d.o.Connections+1))
			if h.Down {
				if g := h.DownSince.Add(p.GiveUp); g.Before(dl) {
					dl = g
				}
			}
			rctx, cancel := context.WithDeadline(ctx, dl)
			err := d.reconnect(rctx)
			cancel()
			ev := EvReconnectOK
			if err != nil {
				ev = EvReconnectFailed
				d.log.Warn("nbd_reconnect_failed", "err", err, "attempt", h.Failures+1)
			}
			var dec Decision
			h, dec = p.Step(h, ev, time.Now())
			if err := act(dec); err != nil {
				return err
			}
		case <-tick.C:
			exists, connected, err := d.nl.status(d.Index)
			if err == nil && (!exists || !connected) {
				d.log.Info("nbd_detached", "reason", "device disconnected")
				return nil
			}
			if d.growTo > 0 && !h.Down {
				d.grow()
			}
			var dec Decision
			h, dec = p.Step(h, EvTick, time.Now())
			if err := act(dec); err != nil {
				return err
			}
		}
	}
}

// Close releases the keeper's netlink sockets without touching the device.
func (d *Device) close() {
	if d.mon != nil {
		d.mon.Close()
		d.mon = nil
	}
	if d.nl != nil {
		d.nl.Close()
		d.nl = nil
	}
}

// ParseDevice returns N for "/dev/nbdN", "nbdN" or "N".
func ParseDevice(dev string) (int, error) {
	s := strings.TrimPrefix(strings.TrimPrefix(dev, "/dev/"), "nbd")
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return -1, fmt.Errorf("%q is not an nbd device (want /dev/nbdN)", dev)
	}
	return n, nil
}

func backendOf(index int) string {
	b, err := os.ReadFile(fmt.Sprintf("/sys/block/nbd%d/backend", index))
	if err != nil || len(strings.TrimSpace(string(b))) == 0 {
		return ""
	}
	return " (volume " + strings.TrimSpace(string(b)) + ")"
}

// MountedAt returns the mount point of dev (or of one of its partitions),
// or "" when it is not mounted.
func MountedAt(dev string) string {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && (f[0] == dev || strings.HasPrefix(f[0], dev+"p")) {
			return f[1]
		}
	}
	return ""
}

// Detach disconnects /dev/nbdN cleanly: it refuses while the device is
// mounted (unless force), stops its keeper (which disconnects), and
// otherwise sends NBD_CMD_DISCONNECT itself; then waits for the device to
// be released.
func Detach(ctx context.Context, dev string, force bool) error {
	idx, err := ParseDevice(dev)
	if err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	path := fmt.Sprintf("/dev/nbd%d", idx)
	if os.Geteuid() != 0 {
		return fmt.Errorf("detach: %w", ErrNotRoot)
	}
	if mp := MountedAt(path); mp != "" && !force {
		return fmt.Errorf("detach: %s: %w: mounted at %s (umount it first, or --force)", path, ErrBusy, mp)
	}
	nl, err := openNBD()
	if err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	defer nl.Close()
	exists, connected, err := nl.status(idx)
	if err != nil {
		return fmt.Errorf("detach: %w", err)
	}
	if !exists || !connected {
		return fmt.Errorf("detach: %s is not connected", path)
	}
	// Stop the keeper first so it does not reconnect what we disconnect.
	if pid, ok := KeeperPid(PidFile(idx)); ok {
		_ = syscall.Kill(pid, syscall.SIGTERM)
	}
	if err := nl.disconnect(idx); err != nil {
		return fmt.Errorf("detach: %s: %w", path, err)
	}
	for {
		_, connected, err := nl.status(idx)
		if err != nil {
			return fmt.Errorf("detach: %w", err)
		}
		if !connected {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("detach: %s still held after disconnect (open by someone?): %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}
