package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// The "nbd" generic netlink family (include/uapi/linux/nbd-netlink.h).
const (
	nbdFamilyName = "nbd"
	nbdMcastGroup = "nbd_mc_group"
	nbdGenlVer    = 1

	cmdConnect     = 1
	cmdDisconnect  = 2
	cmdReconfigure = 3
	cmdLinkDead    = 4
	cmdStatus      = 5

	attrIndex          = 1
	attrSizeBytes      = 2
	attrBlockSizeBytes = 3
	attrTimeout        = 4
	attrServerFlags    = 5
	attrClientFlags    = 6
	attrSockets        = 7
	attrDeadConnTO     = 8
	attrDeviceList     = 9
	attrBackendID      = 10

	sockItem = 1
	sockFD   = 1

	deviceItem      = 1
	deviceIndex     = 1
	deviceConnected = 2

	// genl controller
	ctrlCmdGetFamily  = 3
	ctrlAttrFamilyID  = 1
	ctrlAttrFamilyNm  = 2
	ctrlAttrMcastGrps = 7
	ctrlAttrGrpName   = 1
	ctrlAttrGrpID     = 2
)

// ErrNoModule means the kernel has no nbd driver loaded.
var ErrNoModule = errors.New("the nbd kernel module is not loaded (modprobe nbd)")

// ErrNotRoot means the caller lacks CAP_SYS_ADMIN.
var ErrNotRoot = errors.New("permission denied: attaching an nbd device needs root (CAP_SYS_ADMIN)")

// ErrBusy means the requested /dev/nbdN is already connected.
var ErrBusy = errors.New("device busy: already connected")

// Config is what NBD_CMD_CONNECT / RECONFIGURE carry.
type Config struct {
	Index       int    // -1: the kernel picks a free device
	SizeBytes   uint64 // export size
	BlockSize   uint64 // 4096
	ServerFlags uint16 // transmission flags from the handshake
	Timeout     time.Duration
	DeadConnTO  time.Duration // how long I/O waits for a RECONFIGURE after all connections died
	Backend     string        // backend identifier (the volume name)
}

type nlConn struct {
	fd     int
	seq    atomic.Uint32
	family uint16
	group  uint32
	mu     sync.Mutex
}

func newNL() (*nlConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink bind: %w", err)
	}
	c := &nlConn{fd: fd}
	c.seq.Store(uint32(time.Now().UnixNano()))
	return c, nil
}

// openNBD opens a generic netlink socket resolved to the nbd family.
func openNBD() (*nlConn, error) {
	c, err := newNL()
	if err != nil {
		return nil, err
	}
	if err := c.resolve(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func (c *nlConn) Close() error { return unix.Close(c.fd) }

func (c *nlConn) resolve() error {
	var b attrBuf
	b.str(ctrlAttrFamilyNm, nbdFamilyName)
	msgs, err := c.request(unix.GENL_ID_CTRL, ctrlCmdGetFamily, 1, b.bytes())
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return ErrNoModule
		}
		return fmt.Errorf("netlink: resolve family %q: %w", nbdFamilyName, err)
	}
	for _, m := range msgs {
		attrs := parseAttrs(m)
		if v, ok := attrs[ctrlAttrFamilyID]; ok && len(v) >= 2 {
			c.family = binary.NativeEndian.Uint16(v)
		}
		if v, ok := attrs[ctrlAttrMcastGrps]; ok {
			for _, g := range parseAttrList(v) {
				ga := parseAttrs(g.data)
				if name := cstr(ga[ctrlAttrGrpName]); name == nbdMcastGroup && len(ga[ctrlAttrGrpID]) >= 4 {
					c.group = binary.NativeEndian.Uint32(ga[ctrlAttrGrpID])
				}
			}
		}
	}
	if c.family == 0 {
		return ErrNoModule
	}
	return nil
}

// request sends one message and returns the payloads (after the genl
// header) of the replies, ending at the kernel's ack.
func (c *nlConn) request(family uint16, cmd, version uint8, attrs []byte) ([][]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	seq := c.seq.Add(1)
	msg := make([]byte, 0, 20+len(attrs))
	msg = binary.NativeEndian.AppendUint32(msg, uint32(20+len(attrs)))
	msg = binary.NativeEndian.AppendUint16(msg, family)
	msg = binary.NativeEndian.AppendUint16(msg, unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	msg = binary.NativeEndian.AppendUint32(msg, seq)
	msg = binary.NativeEndian.AppendUint32(msg, 0)
	msg = append(msg, cmd, version, 0, 0)
	msg = append(msg, attrs...)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("netlink send: %w", err)
	}
	var out [][]byte
	buf := make([]byte, 1<<16)
	for {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return nil, fmt.Errorf("netlink recv: %w", err)
		}
		b := buf[:n]
		for len(b) >= 16 {
			l := int(binary.NativeEndian.Uint32(b))
			typ := binary.NativeEndian.Uint16(b[4:])
			mseq := binary.NativeEndian.Uint32(b[8:])
			if l < 16 || l > len(b) {
				return nil, fmt.Errorf("netlink: malformed message")
			}
			body := b[16:l]
			if align4(l) >= len(b) {
				b = nil
			} else {
				b = b[align4(l):]
			}
			if mseq != seq {
				continue
			}
			switch typ {
			case unix.NLMSG_ERROR:
				if len(body) < 4 {
					return nil, fmt.Errorf("netlink: short error message")
				}
				if e := int32(binary.NativeEndian.Uint32(body)); e != 0 {
					return out, unix.Errno(-e)
				}
				return out, nil
			case unix.NLMSG_DONE:
				return out, nil
			default:
				if len(body) >= 4 {
					out = append(out, append([]byte(nil), body[4:]...))
				}
			}
		}
	}
}

func align4(n int) int { return (n + 3) &^ 3 }

type attrBuf struct{ b []byte }

func (a *attrBuf) raw(typ uint16, v []byte) {
	a.b = binary.NativeEndian.AppendUint16(a.b, uint16(4+len(v)))
	a.b = binary.NativeEndian.AppendUint16(a.b, typ)
	a.b = append(a.b, v...)
	for len(a.b)%4 != 0 {
		a.b = append(a.b, 0)
	}
}
func (a *attrBuf) u32(typ uint16, v uint32) { a.raw(typ, binary.NativeEndian.AppendUint32(nil, v)) }
func (a *attrBuf) u64(typ uint16, v uint64) { a.raw(typ, binary.NativeEndian.AppendUint64(nil, v)) }
func (a *attrBuf) str(typ uint16, s string) { a.raw(typ, append([]byte(s), 0)) }
func (a *attrBuf) bytes() []byte            { return a.b }

type rawAttr struct {
	typ  uint16
	data []byte
}

func parseAttrList(b []byte) []rawAttr {
	var out []rawAttr
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b))
		typ := binary.NativeEndian.Uint16(b[2:]) & 0x3fff // strip NESTED/BYTEORDER
		if l < 4 || l > len(b) {
			break
		}
		out = append(out, rawAttr{typ, b[4:l]})
		if align4(l) >= len(b) {
			break
		}
		b = b[align4(l):]
	}
	return out
}

func parseAttrs(b []byte) map[uint16][]byte {
	m := map[uint16][]byte{}
	for _, a := range parseAttrList(b) {
		m[a.typ] = a.data
	}
	return m
}

func cstr(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

func sockets(fds []int) []byte {
	var nest attrBuf
	for _, fd := range fds {
		var item attrBuf
		item.u32(sockFD, uint32(fd))
		nest.raw(sockItem, item.bytes())
	}
	return nest.bytes()
}

func mapErr(op string, err error) error {
	switch {
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return fmt.Errorf("nbd %s: %w", op, ErrNotRoot)
	case errors.Is(err, unix.EBUSY):
		return fmt.Errorf("nbd %s: %w", op, ErrBusy)
	}
	return fmt.Errorf("nbd %s: %w", op, err)
}

// connect hands the sockets to the kernel; it returns the device index.
func (c *nlConn) connect(cfg Config, fds []int) (int, error) {
	var a attrBuf
	if cfg.Index >= 0 {
		a.u32(attrIndex, uint32(cfg.Index))
	}
	a.u64(attrSizeBytes, cfg.SizeBytes)
	a.u64(attrBlockSizeBytes, cfg.BlockSize)
	a.u64(attrServerFlags, uint64(cfg.ServerFlags))
	if cfg.Timeout > 0 {
		a.u64(attrTimeout, uint64(max(1, cfg.Timeout/time.Second)))
	}
	if cfg.DeadConnTO > 0 {
		a.u64(attrDeadConnTO, uint64(max(1, cfg.DeadConnTO/time.Second)))
	}
	if cfg.Backend != "" {
		a.str(attrBackendID, cfg.Backend)
	}
	a.raw(attrSockets, sockets(fds))
	msgs, err := c.request(c.family, cmdConnect, nbdGenlVer, a.bytes())
	if err != nil {
		return -1, mapErr("connect", err)
	}
	for _, m := range msgs {
		if v := parseAttrs(m)[attrIndex]; len(v) >= 4 {
			return int(binary.NativeEndian.Uint32(v)), nil
		}
	}
	if cfg.Index >= 0 {
		return cfg.Index, nil
	}
	return -1, fmt.Errorf("nbd connect: the kernel did not say which device")
}

// reconfigure hands replacement sockets for dead connections of device
// index. The kernel uses as many as it has dead slots and ignores the rest.
// A non-zero size resizes the device (a volume that grew while it was
// away); the resize waits for the requests in flight, so do not send it
// with the sockets those requests wait for (Device.reconnect).
func (c *nlConn) reconfigure(index int, backend string, size uint64, fds []int) error {
	var a attrBuf
	a.u32(attrIndex, uint32(index))
	if size > 0 {
		a.u64(attrSizeBytes, size)
	}
	if backend != "" {
		a.str(attrBackendID, backend)
	}
	if len(fds) > 0 {
		a.raw(attrSockets, sockets(fds))
	}
	if _, err := c.request(c.family, cmdReconfigure, nbdGenlVer, a.bytes()); err != nil {
		return mapErr("reconfigure", err)
	}
	return nil
}

func (c *nlConn) disconnect(index int) error {
	var a attrBuf
	a.u32(attrIndex, uint32(index))
	if _, err := c.request(c.family, cmdDisconnect, nbdGenlVer, a.bytes()); err != nil {
		return mapErr("disconnect", err)
	}
	return nil
}

// status reports whether device index has a configuration (connected, or
// still held by an opener after a disconnect).
func (c *nlConn) status(index int) (exists, connected bool, err error) {
	var a attrBuf
	a.u32(attrIndex, uint32(index))
	msgs, err := c.request(c.family, cmdStatus, nbdGenlVer, a.bytes())
	if err != nil {
		return false, false, mapErr("status", err)
	}
	for _, m := range msgs {
		list := parseAttrs(m)[attrDeviceList]
		for _, item := range parseAttrList(list) {
			d := parseAttrs(item.data)
			if v := d[deviceIndex]; len(v) >= 4 && int(binary.NativeEndian.Uint32(v)) == index {
				return true, len(d[deviceConnected]) >= 1 && d[deviceConnected][0] != 0, nil
			}
		}
	}
	return false, false, nil
}

// monitor delivers the device indexes of NBD_CMD_LINK_DEAD multicasts. A
// receive overflow (lost events) is reported as index -1: "check everything".
type monitor struct {
	c    *nlConn
	ch   chan int
	stop atomic.Bool
	done chan struct{}
}

func newMonitor() (*monitor, error) {
	c, err := openNBD()
	if err != nil {
		return nil, err
	}
	if c.group == 0 {
		c.Close()
		return nil, fmt.Errorf("netlink: the nbd family has no %s multicast group", nbdMcastGroup)
	}
	if err := unix.SetsockoptInt(c.fd, unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, int(c.group)); err != nil {
		c.Close()
		return nil, fmt.Errorf("netlink: join %s: %w", nbdMcastGroup, err)
	}
	tv := unix.Timeval{Sec: 0, Usec: 200000}
	_ = unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	m := &monitor{c: c, ch: make(chan int, 64), done: make(chan struct{})}
	go m.loop()
	return m, nil
}

func (m *monitor) loop() {
	defer close(m.done)
	buf := make([]byte, 1<<16)
	for !m.stop.Load() {
		n, _, err := unix.Recvfrom(m.c.fd, buf, 0)
		if err != nil {
			switch {
			case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINTR):
				continue
			case errors.Is(err, unix.ENOBUFS):
				m.send(-1)
				continue
			}
			// The keeper still polls the device; it can no longer react
			// to dead links at once.
			fmt.Fprintf(os.Stderr, "nbd monitor: receive failed, LINK_DEAD events lost from now on: %v\n", err)
			return
		}
		b := buf[:n]
		for len(b) >= 20 {
			l := int(binary.NativeEndian.Uint32(b))
			if l < 20 || l > len(b) {
				break
			}
			if typ := binary.NativeEndian.Uint16(b[4:]); typ == m.c.family && b[16] == cmdLinkDead {
				if v := parseAttrs(b[20:l])[attrIndex]; len(v) >= 4 {
					m.send(int(binary.NativeEndian.Uint32(v)))
				}
			}
			if align4(l) >= len(b) {
				break
			}
			b = b[align4(l):]
		}
	}
}

func (m *monitor) send(i int) {
	select {
	case m.ch <- i:
	default: // a wakeup is pending already
	}
}

func (m *monitor) Close() {
	m.stop.Store(true)
	<-m.done
	m.c.Close()
}
