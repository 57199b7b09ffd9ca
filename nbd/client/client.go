// Package client is a userspace NBD client: a blockdev.Device over
// pipelined connections to an export that reconnects when they die. It is
// the backend of `blockd attach ublk` when the volume's primary is another
// process. The handshake is nbd/kernel's Negotiate (the same one the kernel
// attach uses); the protocol constants are nbd/wire's.
package client

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/nbd/kernel"
	"github.com/blockd/blockd/nbd/wire"
)

// Options configure Dial.
type Options struct {
	// Export is the export (volume) name.
	Export string
	// Resolve returns the address to connect to now; it is asked again
	// for every reconnect (the current primary after a failover).
	Resolve func(ctx context.Context) (string, error)
	// GiveUp: requests fail with blockdev.ErrIO once the device has been
	// without a connection for this long.
	GiveUp time.Duration
	// Wait: Dial keeps trying this long for an export that is not served
	// yet or refuses (a server starting, a failover); 0 tries once.
	Wait time.Duration
	// TLS, when set, upgrades every connection (NBD_OPT_STARTTLS) with
	// this client config, on every reconnect.
	TLS *tls.Config
	// Logger receives connection events (default slog.Default()).
	Logger *slog.Logger
}

// Device is a blockdev.Device over an NBD connection to the export.
// Requests are pipelined on one connection (simple replies, matched by
// handle). When the connection dies, requests are retried on a new one to
// whatever address Resolve returns then, until GiveUp passes without a
// connection; then they fail with EIO.
type Device struct {
	name    string
	resolve func(ctx context.Context) (string, error)
	giveUp  time.Duration
	tls     *tls.Config
	log     *slog.Logger

	mu     sync.Mutex
	cond   *sync.Cond
	conn   *conn // nil while reconnecting
	export kernel.Export
	gen    int // connection generation
	closed bool
	dialer bool // a goroutine is reconnecting
	down   time.Time
}

type reply struct {
	errno uint32
	err   error // transport failure: retry on a new connection
}

type pending struct {
	buf  []byte // read destination
	done chan reply
}

type conn struct {
	nc      net.Conn
	wmu     sync.Mutex
	mu      sync.Mutex
	pending map[uint64]*pending
	next    uint64
	dead    error
}

// Dial connects to the export at the address o.Resolve gives, retrying
// for o.Wait, and returns the device once the handshake is done.
func Dial(ctx context.Context, o Options) (*Device, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	d := &Device{name: o.Export, resolve: o.Resolve, giveUp: o.GiveUp, tls: o.TLS, log: o.Logger}
	d.cond = sync.NewCond(&d.mu)
	deadline := time.Now().Add(o.Wait)
	for {
		dctx, cancel := context.WithTimeout(ctx, dialTimeout)
		c, exp, err := d.dial(dctx)
		cancel()
		if err == nil {
			d.conn, d.export = c, exp
			return d, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, err
		}
		d.log.Info("ublk_attach_retry", "volume", d.name, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// dialTimeout bounds one connect and handshake.
const dialTimeout = 15 * time.Second

func (d *Device) dial(ctx context.Context) (*conn, kernel.Export, error) {
	addr, err := d.resolve(ctx)
	if err != nil {
		return nil, kernel.Export{}, err
	}
	var nd net.Dialer
	nc, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, kernel.Export{}, fmt.Errorf("nbd: dial %s: %w", addr, err)
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	deadline, _ := ctx.Deadline()
	if deadline.IsZero() {
		deadline = time.Now().Add(30 * time.Second)
	}
	tnc, exp, err := kernel.NegotiateTLS(nc, d.name, deadline, d.tls)
	if err != nil {
		nc.Close()
		return nil, kernel.Export{}, fmt.Errorf("nbd: %s at %s: %w", d.name, addr, err)
	}
	nc = tnc
	nc.SetDeadline(time.Time{})
	c := &conn{nc: nc, pending: map[uint64]*pending{}}
	go c.readLoop()
	d.log.Info("ublk_nbd_connected", "volume", d.name, "addr", addr, "size", exp.Size)
	return c, exp, nil
}

func (c *conn) fail(err error) {
	c.mu.Lock()
	if c.dead == nil {
		c.dead = err
	}
	p := c.pending
	c.pending = map[uint64]*pending{}
	c.mu.Unlock()
	c.nc.Close()
	for _, r := range p {
		r.done <- reply{err: err}
	}
}

func (c *conn) readLoop() {
	r := bufio.NewReaderSize(c.nc, 256<<10)
	var hdr [16]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			c.fail(fmt.Errorf("nbd: read reply: %w", err))
			return
		}
		if binary.BigEndian.Uint32(hdr[0:]) != wire.MagicSimpleReply {
			c.fail(fmt.Errorf("nbd: bad reply magic %#x", binary.BigEndian.Uint32(hdr[0:])))
			return
		}
		errno := binary.BigEndian.Uint32(hdr[4:])
		h := binary.BigEndian.Uint64(hdr[8:])
		c.mu.Lock()
		p := c.pending[h]
		delete(c.pending, h)
		c.mu.Unlock()
		if p == nil {
			c.fail(fmt.Errorf("nbd: reply for unknown handle %d", h))
			return
		}
		if errno == 0 && p.buf != nil {
			if _, err := io.ReadFull(r, p.buf); err != nil {
				p.done <- reply{err: err}
				c.fail(fmt.Errorf("nbd: read data: %w", err))
				return
			}
		}
		p.done <- reply{errno: errno}
	}
}

// send issues one request and waits for its reply.
func (c *conn) do(typ, flags uint16, off int64, length uint32, data, rbuf []byte) reply {
	p := &pending{buf: rbuf, done: make(chan reply, 1)}
	c.mu.Lock()
	if c.dead != nil {
		err := c.dead
		c.mu.Unlock()
		return reply{err: err}
	}
	c.next++
	h := c.next
	c.pending[h] = p
	c.mu.Unlock()
	var hdr [28]byte
	binary.BigEndian.PutUint32(hdr[0:], wire.MagicRequest)
	binary.BigEndian.PutUint16(hdr[4:], flags)
	binary.BigEndian.PutUint16(hdr[6:], typ)
	binary.BigEndian.PutUint64(hdr[8:], h)
	binary.BigEndian.PutUint64(hdr[16:], uint64(off))
	binary.BigEndian.PutUint32(hdr[24:], length)
	c.wmu.Lock()
	bufs := net.Buffers{hdr[:]}
	if data != nil {
		bufs = append(bufs, data)
	}
	_, err := bufs.WriteTo(c.nc)
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("nbd: send: %w", err))
	}
	return <-p.done
}

// current returns a live connection, reconnecting (to the address resolve
// gives now) when the last one died; an error once giveUp has passed.
func (d *Device) current(broken *conn) (*conn, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if broken != nil && d.conn == broken {
		d.conn = nil
		d.down = time.Now()
		d.log.Warn("ublk_nbd_connection_lost", "volume", d.name, "err", broken.dead)
	}
	for d.conn == nil {
		if d.closed {
			return nil, fmt.Errorf("nbd: %s: %w", d.name, blockdev.ErrClosed)
		}
		if time.Since(d.down) > d.giveUp {
			return nil, fmt.Errorf("nbd: %s: no connection for %v: %w", d.name, d.giveUp, blockdev.ErrIO)
		}
		if !d.dialer {
			d.dialer = true
			go d.reconnect()
		}
		d.cond.Wait()
	}
	return d.conn, nil
}

func (d *Device) reconnect() {
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, exp, err := d.dial(ctx)
		cancel()
		d.mu.Lock()
		if err == nil && exp.Size != d.export.Size {
			err = fmt.Errorf("nbd: %s changed size from %d to %d", d.name, d.export.Size, exp.Size)
			c.fail(err)
		}
		if err == nil || d.closed || time.Since(d.down) > d.giveUp {
			if err == nil {
				d.conn = c
				d.gen++
				d.log.Info("ublk_nbd_reconnected", "volume", d.name, "attempt", attempt+1)
			} else {
				d.log.Error("ublk_nbd_give_up", "volume", d.name, "err", err)
			}
			d.dialer = false
			d.cond.Broadcast()
			d.mu.Unlock()
			return
		}
		d.mu.Unlock()
		d.log.Info("ublk_nbd_reconnect_failed", "volume", d.name, "attempt", attempt+1, "err", err)
		time.Sleep(min(time.Duration(attempt+1)*200*time.Millisecond, 2*time.Second))
	}
}

func (d *Device) request(typ, flags uint16, off int64, length uint32, data, rbuf []byte) error {
	var c *conn
	for {
		var err error
		c, err = d.current(c)
		if err != nil {
			return err
		}
		r := c.do(typ, flags, off, length, data, rbuf)
		if r.err != nil {
			continue // connection died: retry on the next one
		}
		if r.errno != 0 {
			return fmt.Errorf("nbd: %s: command %d at %d+%d: %w", d.name, typ, off, length, errnoError(r.errno))
		}
		return nil
	}
}

// errnoError maps an NBD error code onto the blockdev sentinels.
func errnoError(e uint32) error {
	switch syscall.Errno(e) {
	case syscall.EPERM:
		return blockdev.ErrNotPrimary
	case syscall.ENOSPC:
		return blockdev.ErrNoSpace
	case syscall.EINVAL:
		return blockdev.ErrInvalid
	case syscall.EOVERFLOW:
		return blockdev.ErrTooLarge
	}
	return blockdev.ErrIO
}

func (d *Device) Size() int64    { return int64(d.export.Size) }
func (d *Device) BlockSize() int { return 4096 }

func (d *Device) ReadAt(p []byte, off int64) error {
	return d.request(wire.CmdRead, 0, off, uint32(len(p)), nil, p)
}

func (d *Device) WriteAt(p []byte, off int64, fua bool) error {
	var fl uint16
	if fua {
		fl = wire.CmdFlagFUA
	}
	return d.request(wire.CmdWrite, fl, off, uint32(len(p)), p, nil)
}

func (d *Device) Flush() error { return d.request(wire.CmdFlush, 0, 0, 0, nil, nil) }

func (d *Device) Trim(off, n int64) error {
	return d.chunked(off, n, func(o int64, l uint32) error { return d.request(wire.CmdTrim, 0, o, l, nil, nil) })
}

func (d *Device) WriteZeroes(off, n int64, punch bool) error {
	var fl uint16
	if !punch {
		fl = wire.CmdFlagNoHole
	}
	return d.chunked(off, n, func(o int64, l uint32) error { return d.request(wire.CmdWriteZeroes, fl, o, l, nil, nil) })
}

func (d *Device) chunked(off, n int64, fn func(int64, uint32) error) error {
	const max = 1 << 30
	for n > 0 {
		l := min(n, max)
		if err := fn(off, uint32(l)); err != nil {
			return err
		}
		off, n = off+l, n-l
	}
	return nil
}

func (d *Device) BlockStatus(off, n int64) ([]blockdev.Extent, error) {
	return []blockdev.Extent{{Offset: off, Length: n}}, nil
}

// Close sends NBD_CMD_DISC and closes the connection.
func (d *Device) Close() error {
	d.mu.Lock()
	d.closed = true
	c := d.conn
	d.conn = nil
	d.cond.Broadcast()
	d.mu.Unlock()
	if c == nil {
		return nil
	}
	var hdr [28]byte
	binary.BigEndian.PutUint32(hdr[0:], wire.MagicRequest)
	binary.BigEndian.PutUint16(hdr[6:], wire.CmdDisc)
	c.wmu.Lock()
	c.nc.Write(hdr[:])
	c.wmu.Unlock()
	c.fail(errors.New("nbd: closed"))
	return nil
}
