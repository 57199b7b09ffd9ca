package server

// The local control endpoint: HTTP over a unix socket (DATADIR/control.sock,
// mode 0600) through which `blockd attach ublk` asks the volume server to
// host /dev/ublkbN itself, on the same engine-backed device the NBD
// frontend serves (writes gated by the lease, replication applied). No
// network hop, and because the backend lives in the serving process the
// device uses ublk's reissue recovery mode (see ublk.RecoveryMode): a
// restart of the server (kill -9 or a planned one) keeps /dev/ublkbN and a
// mounted filesystem; the restarted server takes the device over with user
// recovery as soon as it is primary again with a live lease.
//
//	POST   /v1/ublk        {"volume": NAME[, "id": N]} → 201 {"volume","path","id"}
//	GET    /v1/ublk        → {"server_id", "devices": [{"volume","path","id","state","io_errors"}]}
//	DELETE /v1/ublk/{id}[?force=1]  → 200 (a mounted device is refused without force)
//
// Errors are {"code": ..., "message": ...} with codes not_found (no such
// volume or device), not_primary (409: the message names the primary),
// bad_request, mounted, ublk_unavailable (503: driver missing, kernel too
// old, no privileges) and internal. The devices served are recorded in
// DATADIR/ublk.json (volume → device number, size) so that a restarted
// server recovers them: as soon as the volume is primary here with a live
// lease (the kernel keeps the device's I/O queued until then), or, when
// that does not happen within 90 s (Config.UblkRecoveryWait), anyway,
// with every request failing (EPERM) rather than hanging.
//
// Requests go to the volume's current primary device on every call
// (liveDevice): a server that is demoted fails them at once with EPERM
// (blockdev.ErrNotPrimary through the lease gate), a re-promoted one
// serves them again.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/ublk"
	"github.com/blockd/blockd/vfs"
)

// ublkStateName is the file recording the served ublk devices.
const ublkStateName = "ublk.json"

// defaultUblkRecoveryWait is Config.UblkRecoveryWait's default.
const defaultUblkRecoveryWait = 90 * time.Second

var errUnknownVolume = errors.New("volume not hosted on this server")

// control is the running control endpoint of one Server (Server.ctl).
type control struct {
	s    *Server
	log  *slog.Logger
	path string
	ln   net.Listener
	http *http.Server

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	opMu    sync.Mutex // serialises device creation, deletion and recovery
	stateMu sync.Mutex // serialises saveState, so the last snapshot is the one on disk
	mu      sync.Mutex
	devs    map[int]*ublkEntry // by device number
}

type ublkEntry struct {
	volume    string
	id        int
	size      int64 // recorded so a device can be recovered while not primary
	blockSize int
	dev       *ublk.Device // nil while waiting for recovery
	ours      bool         // Release/Delete in progress by this server
}

// controlSocketPath is Config.ControlSocket or DATADIR/control.sock.
func (s *Server) controlSocketPath() string {
	if s.cfg.ControlSocket != "" {
		return s.cfg.ControlSocket
	}
	return filepath.Join(s.cfg.DataDir, ControlSocketName)
}

// ControlSocket is the path of the local control socket.
func (s *Server) ControlSocket() string { return s.controlSocketPath() }

// exportDevice is the engine-backed device of a volume this server is the
// primary of (what the NBD frontend serves), or an error naming the
// primary.
func (s *Server) exportDevice(name string) (blockdev.Device, error) {
	s.mu.Lock()
	h := s.vols[name]
	s.mu.Unlock()
	if h == nil {
		return nil, fmt.Errorf("volume %q (server %s): %w", name, s.cfg.ServerID, errUnknownVolume)
	}
	return h.device()
}

// startControl listens on the control socket and starts recovering the
// ublk devices recorded by an earlier run.
func (s *Server) startControl() error {
	c := &control{s: s, log: s.log.With("component", "control"), path: s.controlSocketPath(), devs: map[int]*ublkEntry{}}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	if err := os.MkdirAll(filepath.Dir(c.path), 0o755); err != nil {
		return fmt.Errorf("server: control socket: %w", err)
	}
	_ = os.Remove(c.path) // left by a killed server: the data dir lock is ours
	// Connecting needs write permission on the socket: with the usual
	// umask only the owner has it from the start; 0600 makes it explicit.
	ln, err := net.Listen("unix", c.path)
	if err != nil {
		return fmt.Errorf("server: control socket %s: %w", c.path, err)
	}
	if err := os.Chmod(c.path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("server: control socket %s: %w", c.path, err)
	}
	c.ln = ln
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/ublk", c.handleCreate)
	mux.HandleFunc("GET /v1/ublk", c.handleList)
	mux.HandleFunc("DELETE /v1/ublk/{id}", c.handleDelete)
	c.http = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	saved, err := c.loadState()
	if err != nil {
		// A damaged state file must not keep the server down: the devices
		// it named stay quiesced until detached.
		c.log.Error("ublk_state_unreadable", "path", c.statePath(), "err", err)
	}
	for _, e := range saved {
		e := &ublkEntry{volume: e.Volume, id: e.ID, size: e.SizeBytes, blockSize: e.BlockSize}
		c.devs[e.id] = e
		c.log.Info("ublk_recovery_pending", "volume", e.volume, "dev", e.id, "reason", "recorded by an earlier run; recovered once primary with a live lease")
		c.wg.Add(1)
		go func() { defer c.wg.Done(); c.recoverWhenPrimary(e) }()
	}
	s.ctl = c
	c.wg.Add(1)
	go func() { defer c.wg.Done(); _ = c.http.Serve(ln) }()
	c.log.Info("control_started", "socket", c.path)
	return nil
}

// stopControl closes the control socket and releases every ublk device:
// the devices (and filesystems mounted on them) stay, quiesced, until the
// next run recovers them.
func (s *Server) stopControl() {
	c := s.ctl
	s.ctl = nil
	if c == nil {
		return
	}
	c.cancel()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	_ = c.http.Shutdown(ctx)
	cancel()
	c.wg.Wait()
	_ = os.Remove(c.path)
	c.opMu.Lock()
	defer c.opMu.Unlock()
	c.mu.Lock()
	var devs []*ublkEntry
	for _, e := range c.devs {
		if e.dev != nil {
			e.ours = true
			devs = append(devs, e)
		}
	}
	c.mu.Unlock()
	for _, e := range devs {
		err := e.dev.Release()
		c.log.Info("ublk_released", "volume", e.volume, "dev", e.id, "err", err,
			"reason", "server stopping; the next run recovers the device")
	}
}

// ---- serving ----

// liveDevice is what a server-hosted ublk device serves: every request
// goes to the volume's current primary device (h.device()), so a device
// survives the volume's primary state being rebuilt (a new epoch), and a
// server that is no longer primary fails requests with EPERM at once
// (never hangs them).
type liveDevice struct {
	s         *Server
	name      string
	size      int64
	blockSize int
}

// cur takes no lock on the I/O path: the host's device lookup is an
// atomic load; only a refusal goes through the server's volume map, for
// the error that names the primary.
func (d *liveDevice) cur() (blockdev.Device, error) {
	if dev, ok := d.s.host.Device(d.name); ok {
		return dev, nil
	}
	return d.s.exportDevice(d.name)
}

func (d *liveDevice) Size() int64    { return d.size }
func (d *liveDevice) BlockSize() int { return d.blockSize }
func (d *liveDevice) ReadAt(p []byte, off int64) error {
	dev, err := d.cur()
	if err != nil {
		return err
	}
	return dev.ReadAt(p, off)
}
func (d *liveDevice) WriteAt(p []byte, off int64, fua bool) error {
	dev, err := d.cur()
	if err != nil {
		return err
	}
	return dev.WriteAt(p, off, fua)
}
func (d *liveDevice) Flush() error {
	dev, err := d.cur()
	if err != nil {
		return err
	}
	return dev.Flush()
}
func (d *liveDevice) Trim(off, length int64) error {
	dev, err := d.cur()
	if err != nil {
		return err
	}
	return dev.Trim(off, length)
}
func (d *liveDevice) WriteZeroes(off, length int64, punch bool) error {
	dev, err := d.cur()
	if err != nil {
		return err
	}
	return dev.WriteZeroes(off, length, punch)
}
func (d *liveDevice) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	dev, err := d.cur()
	if err != nil {
		return nil, err
	}
	return dev.BlockStatus(off, length)
}

func (c *control) live(name string) (*liveDevice, error) {
	dev, err := c.s.exportDevice(name)
	if err != nil {
		return nil, err
	}
	return &liveDevice{s: c.s, name: name, size: dev.Size(), blockSize: dev.BlockSize()}, nil
}

func (c *control) options(id int, recover bool) ublk.Options {
	return ublk.Options{DevID: id, Recover: recover, Recovery: ublk.RecoveryReissue, Logger: c.log}
}

// watch forgets a device whose queues ended without this server asking
// (stopped from outside, e.g. ublk.Detach by another process).
func (c *control) watch(e *ublkEntry, d *ublk.Device) {
	defer c.wg.Done()
	select {
	case <-c.ctx.Done():
		return
	case <-d.Done():
	}
	c.mu.Lock()
	if e.ours || c.devs[e.id] != e {
		c.mu.Unlock()
		return
	}
	delete(c.devs, e.id)
	c.mu.Unlock()
	// Close our control ring without DEL_DEV: whoever stopped it deletes it.
	_ = d.Release()
	c.log.Info("ublk_detached_externally", "volume", e.volume, "dev", e.id, "io_errors", d.IOErrors())
	c.saveStateLogged()
}

// recoveryPrimaryWait is how long a restarted server waits for a recorded
// device's volume to be primary here before it takes the device over
// anyway, failing its I/O (EPERM) instead of leaving it queued forever.
func (c *control) recoveryPrimaryWait() time.Duration {
	if d := c.s.cfg.UblkRecoveryWait; d > 0 {
		return d
	}
	return defaultUblkRecoveryWait
}

// recoverWhenPrimary takes over a device recorded by an earlier run once
// the volume is primary here with a live lease: until then the kernel
// holds the device's I/O queued (none fails). When that does not happen
// within recoveryPrimaryWait (the volume failed over to another server
// while this one was down, or was deleted), the device is taken over
// anyway so that its I/O fails instead of hanging. A device that no longer
// exists (the host rebooted) is created again with the same number.
func (c *control) recoverWhenPrimary(e *ublkEntry) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	start, logged, wait := time.Now(), time.Now(), c.recoveryPrimaryWait()
	primary := true
	for !c.s.Serving(e.volume) {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		if e.size > 0 && time.Since(start) > wait {
			primary = false
			c.log.Warn("ublk_recovery_not_primary", "volume", e.volume, "dev", e.id, "waited", time.Since(start).Round(time.Second),
				"reason", "volume not primary here: device taken over with I/O failing (EPERM) instead of queued")
			break
		}
		if time.Since(logged) > 30*time.Second {
			c.log.Info("ublk_recovery_waiting_for_primary", "volume", e.volume, "dev", e.id)
			logged = time.Now()
		}
	}
	c.opMu.Lock()
	defer c.opMu.Unlock()
	if c.ctx.Err() != nil {
		return
	}
	c.mu.Lock()
	still := c.devs[e.id] == e
	c.mu.Unlock()
	if !still {
		return
	}
	live, err := c.live(e.volume)
	if !primary {
		live, err = &liveDevice{s: c.s, name: e.volume, size: e.size, blockSize: e.blockSize}, nil
	}
	if err == nil {
		var d *ublk.Device
		d, err = ublk.Serve(c.ctx, c.s.meter(e.volume, live), c.options(e.id, true))
		if err == nil {
			c.mu.Lock()
			e.dev = d
			c.mu.Unlock()
			c.wg.Add(1)
			go c.watch(e, d)
			c.log.Info("ublk_recovered", "volume", e.volume, "dev", e.id, "path", d.Path())
			return
		}
	}
	c.log.Error("ublk_recovery_failed", "volume", e.volume, "dev", e.id, "err", err,
		"reason", "device forgotten; detach it with `blockd detach`")
	c.mu.Lock()
	if c.devs[e.id] == e {
		delete(c.devs, e.id)
	}
	c.mu.Unlock()
	c.saveStateLogged()
}

// ---- HTTP ----

func (c *control) handleCreate(w http.ResponseWriter, r *http.Request) {
	var req UblkRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeControlError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("bad request body: %v", err))
		return
	}
	if err := validVolumeName(req.Volume); err != nil {
		writeControlError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	id := ublk.AutoID
	if req.ID != nil {
		if *req.ID < 0 {
			writeControlError(w, http.StatusBadRequest, "bad_request", fmt.Sprintf("bad device number %d", *req.ID))
			return
		}
		id = *req.ID
	}
	dev, code, err := c.create(r.Context(), req.Volume, id)
	if err != nil {
		writeErr(w, err)
		return
	}
	writeControlJSON(w, code, dev)
}

// create serves a new device for volume (or returns the one it already
// has: attach is idempotent).
func (c *control) create(ctx context.Context, volume string, id int) (UblkDevice, int, error) {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	c.mu.Lock()
	for _, e := range c.devs {
		if e.volume == volume {
			c.mu.Unlock()
			if e.dev == nil {
				return UblkDevice{}, 0, &ControlError{Code: "busy", Message: fmt.Sprintf("volume %s: %s is waiting for recovery", volume, ublk.BlockPath(e.id))}
			}
			return UblkDevice{Volume: volume, Path: e.dev.Path(), ID: e.id, State: "serving", IOErrors: e.dev.IOErrors()}, http.StatusOK, nil
		}
	}
	c.mu.Unlock()
	live, err := c.live(volume)
	if err != nil {
		return UblkDevice{}, 0, err
	}
	if !c.s.Serving(volume) {
		return UblkDevice{}, 0, fmt.Errorf("volume %s: primary here but its lease is not live yet: %w", volume, blockdev.ErrNotPrimary)
	}
	// The request's context bounds only the setup.
	sctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	d, err := ublk.Serve(sctx, c.s.meter(volume, live), c.options(id, false))
	if err != nil {
		return UblkDevice{}, 0, fmt.Errorf("volume %s: %w", volume, err)
	}
	e := &ublkEntry{volume: volume, id: d.ID(), dev: d, size: live.size, blockSize: live.blockSize}
	c.mu.Lock()
	c.devs[e.id] = e
	c.mu.Unlock()
	if err := c.saveState(); err != nil {
		// Without the record a restart would lose the device: undo.
		c.mu.Lock()
		e.ours = true
		delete(c.devs, e.id)
		c.mu.Unlock()
		_ = d.Delete()
		return UblkDevice{}, 0, err
	}
	c.wg.Add(1)
	go c.watch(e, d)
	c.log.Info("ublk_served", "volume", volume, "dev", e.id, "path", d.Path(), "recovery", ublk.RecoveryReissue.String())
	return UblkDevice{Volume: volume, Path: d.Path(), ID: e.id, State: "serving"}, http.StatusCreated, nil
}

func (c *control) handleList(w http.ResponseWriter, r *http.Request) {
	writeControlJSON(w, http.StatusOK, c.list())
}

func (c *control) list() UblkList {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := UblkList{ServerID: c.s.cfg.ServerID, Devices: []UblkDevice{}}
	for _, e := range c.devs {
		d := UblkDevice{Volume: e.volume, Path: ublk.BlockPath(e.id), ID: e.id, State: "recovering"}
		if e.dev != nil {
			d.State, d.IOErrors = "serving", e.dev.IOErrors()
		}
		out.Devices = append(out.Devices, d)
	}
	sort.Slice(out.Devices, func(i, j int) bool { return out.Devices[i].ID < out.Devices[j].ID })
	return out
}

func (c *control) handleDelete(w http.ResponseWriter, r *http.Request) {
	id, err := ublk.ParsePath(r.PathValue("id"))
	if err != nil {
		writeControlError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	force := r.URL.Query().Get("force") == "1" || r.URL.Query().Get("force") == "true"
	if err := c.delete(r.Context(), id, force); err != nil {
		writeErr(w, err)
		return
	}
	writeControlJSON(w, http.StatusOK, map[string]any{"deleted": ublk.BlockPath(id)})
}

// delete removes a hosted device: STOP_DEV + DEL_DEV. A mounted device is
// refused unless force (then the filesystem sees I/O errors and the device
// number is freed when it is unmounted).
func (c *control) delete(ctx context.Context, id int, force bool) error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	c.mu.Lock()
	e := c.devs[id]
	c.mu.Unlock()
	if e == nil {
		return &ControlError{Code: "not_found", Message: fmt.Sprintf("%s is not hosted by server %s", ublk.BlockPath(id), c.s.cfg.ServerID)}
	}
	mp, _ := ublk.MountPoint(id)
	if mp != "" && !force {
		return &ControlError{Code: "mounted", Message: fmt.Sprintf("%s is mounted at %s; unmount it first (or force)", ublk.BlockPath(id), mp)}
	}
	c.mu.Lock()
	e.ours = true
	c.mu.Unlock()
	var err error
	switch {
	case e.dev == nil:
		// Still waiting for recovery: nobody serves it.
		err = ublk.Detach(ctx, id, force)
		if errors.Is(err, ublk.ErrNoDevice) {
			err = nil
		}
	case mp != "":
		// STOP_DEV, then DEL_DEV_ASYNC (a waiting DEL_DEV would block
		// until the filesystem is unmounted).
		err = ublk.Detach(ctx, id, true)
		if err == nil {
			<-e.dev.Done()
			_ = e.dev.Release()
		}
	default:
		err = e.dev.Delete()
	}
	if err != nil {
		c.mu.Lock()
		e.ours = false
		c.mu.Unlock()
		return fmt.Errorf("delete %s: %w", ublk.BlockPath(id), err)
	}
	c.mu.Lock()
	delete(c.devs, id)
	c.mu.Unlock()
	c.log.Info("ublk_deleted", "volume", e.volume, "dev", id, "forced", force && mp != "")
	return c.saveState()
}

func writeErr(w http.ResponseWriter, err error) {
	var ce *ControlError
	switch {
	case errors.As(err, &ce):
		st := http.StatusConflict
		switch ce.Code {
		case "not_found":
			st = http.StatusNotFound
		case "bad_request":
			st = http.StatusBadRequest
		}
		writeControlError(w, st, ce.Code, ce.Message)
	case errors.Is(err, errUnknownVolume):
		writeControlError(w, http.StatusNotFound, "not_found", err.Error())
	case errors.Is(err, blockdev.ErrNotPrimary):
		writeControlError(w, http.StatusConflict, "not_primary", err.Error())
	case errors.Is(err, ublk.ErrNoDriver), errors.Is(err, ublk.ErrKernelTooOld), errors.Is(err, ublk.ErrPermission):
		writeControlError(w, http.StatusServiceUnavailable, "ublk_unavailable", err.Error())
	case errors.Is(err, blockdev.ErrInvalid), errors.Is(err, ublk.ErrBusy):
		writeControlError(w, http.StatusConflict, "invalid", err.Error())
	default:
		writeControlError(w, http.StatusInternalServerError, "internal", err.Error())
	}
}

func writeControlError(w http.ResponseWriter, status int, code, msg string) {
	writeControlJSON(w, status, ControlError{Code: code, Message: msg})
}

func writeControlJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// ---- state file ----

type ublkState struct {
	Devices []ublkStateEntry `json:"devices"`
}

type ublkStateEntry struct {
	Volume    string `json:"volume"`
	ID        int    `json:"id"`
	SizeBytes int64  `json:"size_bytes,omitempty"`
	BlockSize int    `json:"block_size,omitempty"`
}

func (c *control) statePath() string { return filepath.Join(c.s.cfg.DataDir, ublkStateName) }

func (c *control) loadState() ([]ublkStateEntry, error) {
	b, err := vfs.ReadFile(c.s.cfg.FS, c.statePath())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var st ublkState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("parse %s: %w", c.statePath(), err)
	}
	var out []ublkStateEntry
	seen := map[int]bool{}
	for _, e := range st.Devices {
		if e.ID < 0 || seen[e.ID] || validVolumeName(e.Volume) != nil {
			c.log.Warn("ublk_state_entry_skipped", "volume", e.Volume, "dev", e.ID)
			continue
		}
		seen[e.ID] = true
		out = append(out, e)
	}
	return out, nil
}

// saveState writes ublk.json durably (vfs.WriteFileAtomic).
func (c *control) saveState() error {
	c.stateMu.Lock()
	defer c.stateMu.Unlock()
	c.mu.Lock()
	st := ublkState{Devices: []ublkStateEntry{}}
	for _, e := range c.devs {
		st.Devices = append(st.Devices, ublkStateEntry{Volume: e.volume, ID: e.id, SizeBytes: e.size, BlockSize: e.blockSize})
	}
	c.mu.Unlock()
	sort.Slice(st.Devices, func(i, j int) bool { return st.Devices[i].ID < st.Devices[j].ID })
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("save %s: %w", c.statePath(), err)
	}
	if err := vfs.WriteFileAtomic(c.s.cfg.FS, c.statePath(), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save ublk devices: %w", err)
	}
	return nil
}

func (c *control) saveStateLogged() {
	if err := c.saveState(); err != nil {
		c.log.Error("ublk_state_save_failed", "err", err)
	}
}
