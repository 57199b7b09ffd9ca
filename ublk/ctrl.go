package ublk

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/blockd/blockd/ublk/uring"
	"golang.org/x/sys/unix"
)

// ControlPath is the ublk driver's control node.
const ControlPath = "/dev/ublk-control"

// Errors a caller can test for with errors.Is; each is wrapped with the
// operation and the kernel's answer.
var (
	// ErrNoDriver: /dev/ublk-control does not exist (ublk_drv not loaded,
	// or a kernel built without CONFIG_BLK_DEV_UBLK).
	ErrNoDriver = errors.New("ublk driver not available: load it with 'modprobe ublk_drv' (Linux >= 6.0 with CONFIG_BLK_DEV_UBLK)")
	// ErrKernelTooOld: the kernel lacks io_uring with 128-byte SQEs, or a
	// ublk feature this package needs (GET_FEATURES, ioctl-encoded
	// commands, user recovery).
	ErrKernelTooOld = errors.New("kernel too old for blockd's ublk frontend (needs io_uring with 128-byte SQEs and ublk with GET_FEATURES, ioctl-encoded commands and user recovery; tested on Linux 6.12)")
	// ErrPermission: the caller may not open /dev/ublk-control or create
	// devices (needs root / CAP_SYS_ADMIN).
	ErrPermission = errors.New("permission denied: creating ublk devices needs root (CAP_SYS_ADMIN) and access to /dev/ublk-control")
	// ErrNoDevice: the device ID does not exist.
	ErrNoDevice = errors.New("no such ublk device")
	// ErrBusy: the device is still served by another process.
	ErrBusy = errors.New("ublk device busy")
	// ErrStuck: a control command got no answer from the driver within
	// its bound (ctrlTimeout): the driver is blocked, for example in a
	// device that never quiesces. The command stays in the kernel and the
	// control ring it was sent on is unusable from then on.
	ErrStuck = errors.New("ublk control command got no answer from the driver")
)

// Bounds on control commands: a driver that does not answer fails the
// caller with ErrStuck instead of hanging it. Queries and quick state
// changes answer at once; START_DEV, END_USER_RECOVERY, STOP_DEV and
// DEL_DEV wait for the queues or for requests in flight.
const (
	ctrlTimeout     = 30 * time.Second
	ctrlLongTimeout = 60 * time.Second
)

func cmdTimeout(op uint32) time.Duration {
	switch op {
	case cmdStartDev, cmdEndUserRecovery, cmdStopDev, cmdDelDev:
		return ctrlLongTimeout
	}
	return ctrlTimeout
}

// RequiredFeatures are the driver features Serve and Recover depend on.
const RequiredFeatures = FeatCmdIoctlEncode | FeatUserRecovery

// control is an io_uring on /dev/ublk-control. Commands run one at a time.
type control struct {
	mu   sync.Mutex
	fd   int
	ring *uring.Ring
	// buf is an mmapped page for command payloads: the kernel may run a
	// control command asynchronously (START_DEV blocks in an io-wq worker),
	// so the payload must live outside the Go heap and stack.
	buf []byte
	// stuck: a command timed out and is still in the kernel, which may
	// yet write its answer into buf (so buf is never unmapped then).
	stuck error
}

func openControl() (*control, error) {
	fd, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO):
		return nil, fmt.Errorf("ublk: open %s: %w: %w", ControlPath, ErrNoDriver, err)
	case errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM):
		return nil, fmt.Errorf("ublk: open %s: %w: %w", ControlPath, ErrPermission, err)
	case err != nil:
		return nil, fmt.Errorf("ublk: open %s: %w", ControlPath, err)
	}
	ring, err := uring.New(4, uring.SetupSQE128)
	if err != nil {
		unix.Close(fd)
		switch {
		case errors.Is(err, unix.EINVAL): // SQE128 unknown: before 5.19
			return nil, fmt.Errorf("ublk: control ring: %w: %w", ErrKernelTooOld, err)
		case errors.Is(err, unix.ENOSYS):
			return nil, fmt.Errorf("ublk: control ring: io_uring not available: %w: %w", ErrKernelTooOld, err)
		case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
			return nil, fmt.Errorf("ublk: control ring: io_uring refused (kernel.io_uring_disabled?): %w: %w", ErrPermission, err)
		}
		return nil, fmt.Errorf("ublk: control ring: %w", err)
	}
	buf, err := unix.Mmap(-1, 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		ring.Close()
		unix.Close(fd)
		return nil, fmt.Errorf("ublk: control buffer: %w", err)
	}
	return &control{fd: fd, ring: ring, buf: buf}, nil
}

func (c *control) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ring != nil {
		c.ring.Close()
		c.ring = nil
	}
	if c.buf != nil && c.stuck == nil {
		unix.Munmap(c.buf)
	}
	c.buf = nil
	if c.fd >= 0 {
		unix.Close(c.fd)
		c.fd = -1
	}
}

// cmd runs one control command. in is copied into the payload buffer (and
// addr/len point at it when in or outLen is non-zero); the first outLen
// bytes of the buffer are returned afterwards. The result is the CQE's res
// (>= 0) or a syscall.Errno for a negative res.
func (c *control) cmd(op uint32, devID uint32, data uint64, in []byte, outLen int) (int32, []byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ring == nil {
		return 0, nil, fmt.Errorf("ublk: control closed")
	}
	if c.stuck != nil {
		return 0, nil, fmt.Errorf("ublk: control ring unusable: %w", c.stuck)
	}
	hdr := ctrlCmd{devID: devID, queueID: 0xffff, data: data}
	n := max(len(in), outLen)
	if n > len(c.buf) {
		return 0, nil, fmt.Errorf("ublk: control payload of %d bytes too large", n)
	}
	if n > 0 {
		clear(c.buf[:n])
		copy(c.buf, in)
		hdr.addr = uint64(uintptr(unsafe.Pointer(&c.buf[0])))
		hdr.length = uint16(n)
	}
	sqe := c.ring.GetSQE()
	if sqe == nil {
		return 0, nil, fmt.Errorf("ublk: control ring full")
	}
	sqe.Opcode = uring.OpURingCmd
	sqe.Fd = int32(c.fd)
	sqe.SetCmdOp(op)
	sqe.UserData = uint64(op)
	hdr.encode(c.ring.Cmd(sqe))
	timeout := cmdTimeout(op)
	cqe, err := c.ring.WaitCQETimeout(timeout)
	if errors.Is(err, uring.ErrTimeout) {
		c.stuck = fmt.Errorf("control command %#x sent %v ago is still in the kernel: %w", op, timeout, ErrStuck)
		return 0, nil, fmt.Errorf("no answer from the driver in %v: %w", timeout, ErrStuck)
	}
	if err != nil {
		return 0, nil, fmt.Errorf("ublk: control command %#x: %w", op, err)
	}
	if cqe.Res < 0 {
		return cqe.Res, nil, syscall.Errno(-cqe.Res)
	}
	var out []byte
	if outLen > 0 {
		out = append([]byte(nil), c.buf[:outLen]...)
	}
	return cqe.Res, out, nil
}

// getFeatures asks the driver which UBLK_F_* features it supports.
func (c *control) getFeatures() (uint64, error) {
	_, out, err := c.cmd(cmdGetFeatures, 0, 0, nil, 8)
	if err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY) {
			return 0, fmt.Errorf("ublk: GET_FEATURES: %w: %w", ErrKernelTooOld, err)
		}
		return 0, fmt.Errorf("ublk: GET_FEATURES: %w", err)
	}
	return uint64(out[0]) | uint64(out[1])<<8 | uint64(out[2])<<16 | uint64(out[3])<<24 |
		uint64(out[4])<<32 | uint64(out[5])<<40 | uint64(out[6])<<48 | uint64(out[7])<<56, nil
}

func (c *control) addDev(info DevInfo) (DevInfo, error) {
	b := make([]byte, devInfoSize)
	info.encode(b)
	_, out, err := c.cmd(cmdAddDev, info.DevID, 0, b, devInfoSize)
	if err != nil {
		return DevInfo{}, fmt.Errorf("ublk: ADD_DEV: %w", mapCtrlErr(err))
	}
	return decodeDevInfo(out), nil
}

func (c *control) getDevInfo(id uint32) (DevInfo, error) {
	_, out, err := c.cmd(cmdGetDevInfo, id, 0, nil, devInfoSize)
	if err != nil {
		return DevInfo{}, fmt.Errorf("ublk: GET_DEV_INFO %d: %w", id, mapCtrlErr(err))
	}
	return decodeDevInfo(out), nil
}

func (c *control) setParams(id uint32, p params) error {
	b := make([]byte, paramsLen)
	p.encode(b)
	if _, _, err := c.cmd(cmdSetParams, id, 0, b, 0); err != nil {
		return fmt.Errorf("ublk: SET_PARAMS %d: %w", id, mapCtrlErr(err))
	}
	return nil
}

func (c *control) simple(name string, op uint32, id uint32, data uint64) error {
	if _, _, err := c.cmd(op, id, data, nil, 0); err != nil {
		return fmt.Errorf("ublk: %s %d: %w", name, id, mapCtrlErr(err))
	}
	return nil
}

// mapCtrlErr attaches this package's sentinels to the kernel's errnos.
func mapCtrlErr(err error) error {
	switch {
	case errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES):
		return fmt.Errorf("%w: %w", ErrPermission, err)
	case errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT):
		return fmt.Errorf("%w: %w", ErrNoDevice, err)
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("%w: %w", ErrBusy, err)
	case errors.Is(err, unix.EOPNOTSUPP):
		return fmt.Errorf("%w: %w", ErrKernelTooOld, err)
	}
	return err
}

// Features reports the ublk features of the running kernel (GET_FEATURES).
func Features() (uint64, error) {
	c, err := openControl()
	if err != nil {
		return 0, err
	}
	defer c.close()
	return c.getFeatures()
}

// Info returns the driver's view of device id (GET_DEV_INFO).
func Info(id int) (DevInfo, error) {
	c, err := openControl()
	if err != nil {
		return DevInfo{}, err
	}
	defer c.close()
	return c.getDevInfo(uint32(id))
}
