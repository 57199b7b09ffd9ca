// Package ublk exports a blockdev.Device as a Linux ublk block device
// (/dev/ublkbN): the kernel's ublk_drv hands block requests to this process
// through io_uring passthrough commands on /dev/ublkcN, one io_uring and one
// OS thread per hardware queue, and the results go back the same way. No
// TCP is involved, and with UBLK_F_USER_RECOVERY the block device survives
// a restart of the serving process.
//
// Facts this package relies on (checked on Debian's 6.12 kernel): control
// commands are URING_CMDs on /dev/ublk-control with 128-byte SQEs; START_DEV
// blocks until every queue has fetched all of its tags and then reads the
// partition table through the queues, so the queue loops start first;
// STOP_DEV completes outstanding fetches with -ENODEV; DEL_DEV succeeds once
// the queue rings and /dev/ublkcN are closed.
package ublk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/blockd/blockd/blockdev"
	"golang.org/x/sys/unix"
)

// RecoveryMode decides what happens to requests that were handed to this
// process when it dies, and whether the device survives it at all.
//
// The default is RecoveryReissue, deliberately. The alternative,
// RecoveryFail (plain UBLK_F_USER_RECOVERY), completes every request the
// dead server had accepted with an I/O error: a filesystem mounted on the
// device sees EIO on a metadata write and ext4 aborts its journal and
// remounts read-only, which is exactly the outage user recovery exists to
// avoid. Reissue's hazard is a write replayed after a newer write to the
// same block. That needs a write of the dead process to still be in flight
// somewhere after the new process has started. When the backing Device
// lives in the serving process (the blockvol engine, a local file) that
// cannot happen: the driver only lets START_USER_RECOVERY through once the
// old process is gone and /dev/ublkcN released, so each of its writes
// either reached the engine or never will, and a replayed request carries
// the same data to the same place (idempotent). The block layer never
// orders requests that are in flight together, and a filesystem issues a
// dependent write only after the earlier one completed, which for a
// replayed request happens only in the new process. The hazard is real for
// a backend reached over the network (a write still queued in the dead
// process's socket or at the remote server can land after the replay and
// a newer write): such callers must fence the old connection first (a new
// epoch or lease at the primary) or choose RecoveryFail.
type RecoveryMode int

const (
	// RecoveryReissue: UBLK_F_USER_RECOVERY|UBLK_F_USER_RECOVERY_REISSUE.
	// Requests in flight when the server dies are requeued and replayed to
	// the next server.
	RecoveryReissue RecoveryMode = iota
	// RecoveryFail: UBLK_F_USER_RECOVERY. Requests the dead server had
	// accepted fail with EIO; requests not yet handed over wait.
	RecoveryFail
	// RecoveryNone: the device is removed when the server exits.
	RecoveryNone
)

func (m RecoveryMode) String() string {
	switch m {
	case RecoveryReissue:
		return "reissue"
	case RecoveryFail:
		return "fail"
	case RecoveryNone:
		return "none"
	}
	return "RecoveryMode(" + strconv.Itoa(int(m)) + ")"
}

func (m RecoveryMode) flags() uint64 {
	switch m {
	case RecoveryReissue:
		return FeatUserRecovery | FeatUserRecoveryReiss
	case RecoveryFail:
		return FeatUserRecovery
	}
	return 0
}

// Options configure Serve.
type Options struct {
	// Queues is the number of hardware queues (default: the number of
	// CPUs, at most 4). The driver caps it at the number of CPUs.
	Queues int
	// Depth is the number of requests in flight per queue (default 64).
	Depth int
	// MaxIO is the largest request in bytes (default 512 KiB, at most
	// blockdev.MaxIOSize). Each tag owns a buffer of this size.
	MaxIO int
	// DevID selects /dev/ublkb<DevID>; negative lets the driver choose.
	// Note that 0 means device 0.
	DevID int
	// Recover: when device DevID already exists (its server died), take it
	// over through user recovery instead of failing.
	Recover bool
	// Recovery is the recovery mode of a new device (see RecoveryMode).
	Recovery RecoveryMode
	// Logger receives structured events (nil: slog.Default()).
	Logger *slog.Logger
	// Inline chooses where requests run (default InlineNever: workers).
	Inline InlineMode
}

// InlineMode decides which requests run on the queue thread itself rather
// than on a worker goroutine.
type InlineMode int

const (
	// InlineNever (default): every request goes to a worker goroutine, so
	// up to Depth requests per queue execute at once; the queue thread
	// only moves commands and descriptors.
	InlineNever InlineMode = iota
	// InlineAuto: reads and non-FUA writes run on the queue thread while
	// they complete within 200µs (saving two thread hand-offs each);
	// after a slower one the queue uses workers for every request for a
	// second. Flushes, FUA writes, discards and write-zeroes always go to
	// workers. In the emulated guest it measured no better than
	// InlineNever (often worse: emulated requests often exceed the
	// threshold, so the queue keeps switching), hence not the default.
	InlineAuto
	// InlineAlways: every request runs on the queue thread, one at a time
	// per queue (only for backends that never block). It shows the cost
	// of the hand-off: in the emulated guest about 1.5-1.8x the IOPS of
	// InlineNever on reads.
	InlineAlways
)

// AutoID asks the driver to choose the device number.
const AutoID = -1

func (o *Options) fill() error {
	if o.Queues <= 0 {
		o.Queues = min(runtime.NumCPU(), 4)
	}
	if o.Depth <= 0 {
		o.Depth = 64
	}
	if o.MaxIO <= 0 {
		o.MaxIO = 512 << 10
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	ps := os.Getpagesize()
	switch {
	case o.Queues > maxQueues:
		return fmt.Errorf("ublk: %d queues (max %d): %w", o.Queues, maxQueues, blockdev.ErrInvalid)
	case o.Depth > maxQueueDepth:
		return fmt.Errorf("ublk: depth %d (max %d): %w", o.Depth, maxQueueDepth, blockdev.ErrInvalid)
	case o.MaxIO > blockdev.MaxIOSize || o.MaxIO > maxIOBufBytes || o.MaxIO%ps != 0:
		return fmt.Errorf("ublk: max I/O %d must be a multiple of %d up to %d: %w", o.MaxIO, ps, blockdev.MaxIOSize, blockdev.ErrInvalid)
	case o.Recovery < RecoveryReissue || o.Recovery > RecoveryNone:
		return fmt.Errorf("ublk: unknown recovery mode %d: %w", o.Recovery, blockdev.ErrInvalid)
	}
	return nil
}

// Device is a running ublk device served by this process.
type Device struct {
	info   DevInfo
	ctl    *control
	dev    blockdev.Device
	charFd int
	queues []*queue
	log    *slog.Logger

	inline   InlineMode
	ioErrors atomic.Int64
	stats    devStats // observe.go
	done     chan struct{}
	once     sync.Once
	ctlOnce  sync.Once
	ringMu   sync.Mutex // closeKeptRings
}

// ID is the device number N of /dev/ublkbN.
func (d *Device) ID() int { return int(d.info.DevID) }

// Path is the block device, /dev/ublkbN.
func (d *Device) Path() string { return BlockPath(d.ID()) }

// Info is the driver's device info as of creation or recovery.
func (d *Device) Info() DevInfo { return d.info }

// IOErrors counts requests that were completed with an error.
func (d *Device) IOErrors() int64 { return d.ioErrors.Load() }

// Done is closed when every queue loop has ended (after Stop, Release, or
// a STOP_DEV from another process such as `blockd detach`).
func (d *Device) Done() <-chan struct{} { return d.done }

// BlockPath and CharPath name the device nodes of device id.
func BlockPath(id int) string { return "/dev/ublkb" + strconv.Itoa(id) }

// CharPath is /dev/ublkcN, the per-device node the server talks to.
func CharPath(id int) string { return "/dev/ublkc" + strconv.Itoa(id) }

// ParsePath returns N for /dev/ublkbN (or /dev/ublkcN, or plain N).
func ParsePath(p string) (int, error) {
	s := strings.TrimPrefix(strings.TrimPrefix(strings.TrimPrefix(p, "/dev/"), "ublkb"), "ublkc")
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || s != strconv.Itoa(n) || (p != s && !strings.HasPrefix(p, "/dev/ublk")) {
		return 0, fmt.Errorf("ublk: %q is not a ublk device path (/dev/ublkbN): %w", p, blockdev.ErrInvalid)
	}
	return n, nil
}

// Serve creates a ublk device for dev (or, with Options.Recover, takes
// over an existing one whose server died) and serves it until Stop,
// Delete or Release. ctx bounds only the setup.
func Serve(ctx context.Context, dev blockdev.Device, o Options) (*Device, error) {
	if err := o.fill(); err != nil {
		return nil, err
	}
	if ctx == nil {
		ctx = context.Background()
	}
	size := dev.Size()
	bs := dev.BlockSize()
	if bs < blockdev.SectorSize || bs > os.Getpagesize() || bs&(bs-1) != 0 {
		bs = 4096
	}
	if size <= 0 || size%int64(bs) != 0 {
		return nil, fmt.Errorf("ublk: device size %d is not a positive multiple of the block size %d: %w", size, bs, blockdev.ErrInvalid)
	}
	ctl, err := openControl()
	if err != nil {
		return nil, err
	}
	feats, err := ctl.getFeatures()
	if err != nil {
		ctl.close()
		return nil, err
	}
	need := uint64(FeatCmdIoctlEncode) | o.Recovery.flags()
	if feats&need != need {
		ctl.close()
		return nil, fmt.Errorf("ublk: driver features %#x lack %#x: %w", feats, need&^feats, ErrKernelTooOld)
	}
	if o.Recover && o.DevID >= 0 {
		_, err := ctl.getDevInfo(uint32(o.DevID))
		if err == nil {
			return recoverDev(ctx, ctl, uint32(o.DevID), dev, o)
		}
		if !errors.Is(err, ErrNoDevice) {
			ctl.close()
			return nil, err
		}
	}
	id := uint32(0xffffffff)
	if o.DevID >= 0 {
		id = uint32(o.DevID)
	}
	info, err := ctl.addDev(DevInfo{
		NrHWQueues:    uint16(o.Queues),
		QueueDepth:    uint16(o.Depth),
		MaxIOBufBytes: uint32(o.MaxIO),
		DevID:         id,
		Flags:         FeatCmdIoctlEncode | o.Recovery.flags(),
	})
	if err != nil {
		ctl.close()
		return nil, err
	}
	d := &Device{info: info, ctl: ctl, dev: dev, charFd: -1, log: o.Logger, done: make(chan struct{}), inline: o.Inline}
	d.log.Info("ublk_device_added", "dev", info.DevID, "queues", info.NrHWQueues, "depth", info.QueueDepth,
		"max_io", info.MaxIOBufBytes, "flags", fmt.Sprintf("%#x", info.Flags), "recovery", o.Recovery.String(), "size", size)
	fail := func(err error) (*Device, error) {
		d.abandon()
		if derr := ctl.simple("DEL_DEV", cmdDelDev, info.DevID, 0); derr != nil {
			d.log.Warn("ublk_device_delete_failed", "dev", info.DevID, "err", derr)
		}
		d.closeCtl()
		return nil, err
	}
	maxSectors := info.MaxIOBufBytes / blockdev.SectorSize
	shift := uint8(0)
	for 1<<shift < bs {
		shift++
	}
	const maxDiscard = 1 << 22 // sectors (2 GiB) per discard / write-zeroes request
	p := params{
		attrs:                 attrVolatileCache | attrFUA,
		logicalBSShift:        shift,
		physicalBSShift:       shift,
		ioOptShift:            shift,
		ioMinShift:            shift,
		maxSectors:            maxSectors,
		devSectors:            uint64(size / blockdev.SectorSize),
		discardGranularity:    uint32(bs),
		maxDiscardSectors:     maxDiscard,
		maxWriteZeroesSectors: maxDiscard,
		maxDiscardSegments:    1,
	}
	if err := ctl.setParams(info.DevID, p); err != nil {
		return fail(err)
	}
	if err := d.openChar(ctx); err != nil {
		return fail(err)
	}
	if err := d.startQueues(); err != nil {
		return fail(err)
	}
	// START_DEV returns once the queues have fetched every tag and the
	// partition scan has been served by them.
	if err := ctl.simple("START_DEV", cmdStartDev, info.DevID, uint64(os.Getpid())); err != nil {
		return fail(err)
	}
	go d.watch()
	d.log.Info("ublk_device_started", "dev", info.DevID, "path", d.Path())
	return d, nil
}

// openChar opens /dev/ublkcN, waiting for devtmpfs to create it (and
// creating the node from sysfs if /dev is not devtmpfs).
func (d *Device) openChar(ctx context.Context) error {
	path := CharPath(d.ID())
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; ; i++ {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			d.charFd = fd
			return nil
		}
		if !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("ublk: open %s: %w", path, mapCtrlErr(err))
		}
		if errors.Is(err, unix.ENOENT) && i == 50 {
			mknodFromSysfs(d.ID(), path)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("ublk: open %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("ublk: open %s: %w", path, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func mknodFromSysfs(id int, path string) {
	b, err := os.ReadFile("/sys/class/ublk-char/ublkc" + strconv.Itoa(id) + "/dev")
	if err != nil {
		return
	}
	var maj, mnr uint32
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &maj, &mnr); err != nil {
		return
	}
	unix.Mknod(path, unix.S_IFCHR|0o600, int(unix.Mkdev(maj, mnr)))
}

func (d *Device) startQueues() error {
	n := int(d.info.NrHWQueues)
	d.queues = make([]*queue, n)
	for i := range d.queues {
		q := newQueue(d, i)
		d.queues[i] = q
		ready := make(chan error, 1)
		goLocked(func() { q.run(ready) })
		if err := <-ready; err != nil {
			d.queues = d.queues[:i+1]
			return err
		}
	}
	return nil
}

// watch waits for the queue loops and releases what they shared.
func (d *Device) watch() {
	var errs []error
	for _, q := range d.queues {
		<-q.exited
		if q.err != nil && !errors.Is(q.err, errStopped) {
			errs = append(errs, q.err)
		}
	}
	d.release()
	if len(errs) > 0 {
		d.log.Error("ublk_device_queues_failed", "dev", d.info.DevID, "err", errors.Join(errs...))
	} else {
		d.log.Info("ublk_device_queues_done", "dev", d.info.DevID)
	}
	close(d.done)
}

func (d *Device) release() {
	d.once.Do(func() {
		for _, q := range d.queues {
			if q.bufs != nil {
				unix.Munmap(q.bufs)
				q.bufs = nil
			}
		}
		if d.charFd >= 0 {
			unix.Close(d.charFd)
			d.charFd = -1
		}
	})
}

// abandon stops queue loops that are running and releases everything,
// without telling the driver (setup failures).
func (d *Device) abandon() {
	for _, q := range d.queues {
		q.stop()
	}
	for _, q := range d.queues {
		<-q.exited
	}
	d.release()
	d.closeKeptRings()
}

func (d *Device) closeCtl() { d.ctlOnce.Do(func() { d.ctl.close() }) }

func (d *Device) wait(ctx context.Context) error {
	select {
	case <-d.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("ublk: device %d: queues still running: %w", d.info.DevID, ctx.Err())
	}
}

// Stop removes /dev/ublkbN (STOP_DEV): requests in flight are completed,
// later ones fail, the queue loops end. The ublkc node and device number
// remain until Delete.
func (d *Device) Stop() error {
	err := d.ctl.simple("STOP_DEV", cmdStopDev, d.info.DevID, 0)
	if err != nil && !errors.Is(err, ErrNoDevice) {
		return err
	}
	// STOP_DEV has aborted every fetch; the loops exit after their last
	// commit. A generous bound guards against a wedged device.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := d.wait(ctx); err != nil {
		return err
	}
	d.log.Info("ublk_device_stopped", "dev", d.info.DevID)
	return nil
}

// Delete stops the device if needed and removes it from the driver
// (DEL_DEV), freeing the device number.
func (d *Device) Delete() error {
	select {
	case <-d.done:
	default:
		if err := d.Stop(); err != nil {
			return err
		}
	}
	err := d.ctl.simple("DEL_DEV", cmdDelDev, d.info.DevID, 0)
	d.closeCtl()
	if err != nil && !errors.Is(err, ErrNoDevice) {
		return err
	}
	d.log.Info("ublk_device_deleted", "dev", d.info.DevID)
	return nil
}

// Release ends this process's service of the device without removing it:
// the queue loops finish the requests they hold and end their threads,
// then their rings are closed (see closeKeptRings), and the driver
// quiesces the device until a new server calls Recover. Used for a
// planned restart (upgrade) of the serving process.
func (d *Device) Release() error {
	for _, q := range d.queues {
		q.stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	err := d.wait(ctx)
	if err == nil {
		d.closeKeptRings()
	}
	d.closeCtl()
	d.log.Info("ublk_device_released", "dev", d.info.DevID, "err", err)
	return err
}

// StopDevice and DeleteDevice act on a device served by another process
// (`blockd detach /dev/ublkbN`): STOP_DEV makes that server's queue loops
// end; DEL_DEV then waits until it has closed /dev/ublkcN.
func StopDevice(id int) error {
	c, err := openControl()
	if err != nil {
		return err
	}
	defer c.close()
	return c.simple("STOP_DEV", cmdStopDev, uint32(id), 0)
}

// DeleteDevice removes device id (see StopDevice). It blocks until the
// serving process has let go of /dev/ublkcN or ctx ends.
func DeleteDevice(ctx context.Context, id int) error {
	c, err := openControl()
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- c.simple("DEL_DEV", cmdDelDev, uint32(id), 0) }()
	select {
	case err := <-errc:
		c.close()
		return err
	case <-ctx.Done():
		// The DEL_DEV stays queued in the kernel; it is cancelled when this
		// process exits. The ring cannot be closed while it is in use.
		return fmt.Errorf("ublk: DEL_DEV %d: %w", id, ctx.Err())
	}
}

// MountPoint returns where /dev/ublkbN is mounted, or "" when it is not
// (matched by device number in /proc/self/mountinfo).
func MountPoint(id int) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(BlockPath(id), &st); err != nil {
		return "", nil
	}
	want := fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("ublk: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[2] == want {
			return f[4], nil
		}
	}
	return "", nil
}

// ErrMounted: Detach refused because the device holds a mounted filesystem.
var ErrMounted = errors.New("device is mounted")

// Detach removes device id served by another process: STOP_DEV (requests
// in flight complete, later ones fail with EIO, the server's queue loops
// end), then DEL_DEV, which returns once the server has closed
// /dev/ublkcN. A mounted device is refused unless force is set; with force
// the filesystem sees I/O errors from then on, and the device number is
// freed by the driver when the filesystem is unmounted (DEL_DEV_ASYNC, so
// detach does not wait for that). ctx bounds the wait.
func Detach(ctx context.Context, id int, force bool) error {
	mp, _ := MountPoint(id)
	if mp != "" && !force {
		return fmt.Errorf("ublk: %s is mounted at %s; unmount it first (or force): %w", BlockPath(id), mp, ErrMounted)
	}
	if err := StopDevice(id); err != nil && !errors.Is(err, ErrNoDevice) {
		return err
	}
	if mp != "" {
		c, err := openControl()
		if err != nil {
			return err
		}
		defer c.close()
		err = c.simple("DEL_DEV_ASYNC", cmdDelDevAsync, uint32(id), 0)
		if err == nil || errors.Is(err, ErrNoDevice) {
			return nil
		}
		// Before 6.9: fall through to the waiting DEL_DEV.
	}
	return DeleteDevice(ctx, id)
}
