package nbd

import (
	"bufio"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/nbd/wire"
)

const readBufferSize = 256 << 10

type conn struct {
	srv    *Server
	nc     net.Conn
	br     *bufio.Reader // reads src through fill
	src    io.Reader     // the connection's byte stream: nc, or TLS's reader
	fill   fillLimiter
	remote string
	done   chan struct{}

	// negotiation results
	noZeroes   bool
	structured bool
	metaAlloc  bool
	metaSel    []metaSel // the device's contexts negotiated (meta.go)
	metaExport string

	peer        *x509.Certificate // the verified client certificate after STARTTLS
	warnedPlain bool              // a TLS_REQD refusal was logged

	mu    sync.Mutex // guards exp and phase
	exp   Export
	phase int // 0 negotiating, 1 transmitting, 2 draining

	dev    blockdev.Device
	size   int64
	tflags uint16

	// Transmission uses a pool of workers per connection, each of which
	// takes the read lock, reads one request (header and payload),
	// releases the lock and executes the request ("leader/followers"):
	// no hand-off between a reader and executors. The pool grows while
	// every worker is busy and requests keep coming, up to maxInFlight.
	readMu     sync.Mutex
	stopped    bool   // under readMu: no more requests will be read
	stopReason string // under readMu
	waiting    atomic.Int32
	nworkers   int             // under readMu
	aloneRun   int             // under readMu: requests in a row that arrived alone (inlineSyncOK)
	raw        syscall.RawConn // the socket under any TLS, for inputWaiting; nil if not a syscall.Conn
	workers    sync.WaitGroup

	out      sender
	draining atomic.Bool
	latency  atomic.Int64 // EWMA of read/write execution time, ns
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{
		srv:    s,
		nc:     nc,
		remote: nc.RemoteAddr().String(),
		done:   make(chan struct{}),
	}
	c.setSource(nc)
	c.out.nc = nc
	if sc, ok := nc.(syscall.Conn); ok {
		c.raw, _ = sc.SyscallConn()
	}
	c.latency.Store(2 * inlineMaxLatency) // start cautious: hand off
	return c
}

// setSource makes r the connection's byte stream (STARTTLS replaces it).
func (c *conn) setSource(r io.Reader) {
	c.src = r
	c.fill = fillLimiter{r: r}
	c.br = bufio.NewReaderSize(&c.fill, readBufferSize)
}

// Large write payloads are read straight from the stream into the
// request's buffer: through the bufio.Reader every byte was copied once
// more (8% of the CPU of 1 MiB writes). After such a payload the next
// fill of the buffer reads only a request header, so that the buffer does
// not take (and copy) the start of the payload behind it.
const directReadMin = 128 << 10 // above inlineMaxLen: an inline request keeps its reply batching

// fillLimiter caps the reads the bufio.Reader makes while limit > 0.
type fillLimiter struct {
	r     io.Reader
	limit int
}

func (f *fillLimiter) Read(p []byte) (int, error) {
	if f.limit > 0 && len(p) > f.limit {
		p = p[:f.limit]
	}
	return f.r.Read(p)
}

// readPayload reads a write's payload into p.
func (c *conn) readPayload(p []byte) error {
	if len(p) < directReadMin {
		_, err := io.ReadFull(c.br, p)
		return err
	}
	k, _ := c.br.Read(p[:min(c.br.Buffered(), len(p))]) // what the buffer holds already
	if _, err := io.ReadFull(c.src, p[k:]); err != nil {
		return err
	}
	c.fill.limit = wire.RequestSize
	return nil
}

// releaseExport gives the selected export back (Export.Release) once the
// connection is done with it.
func (c *conn) releaseExport() {
	c.mu.Lock()
	e := c.exp
	c.exp.Release = nil
	c.mu.Unlock()
	e.release()
}

func (c *conn) exportName() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.exp.Name
}

func (c *conn) serve() {
	defer close(c.done)
	defer func() { c.nc.Close() }() // the TLS conn once STARTTLS replaced it
	defer c.releaseExport()
	log := c.srv.log
	if err := c.negotiate(); err != nil {
		if !errors.Is(err, errAbort) {
			log.Info("nbd_negotiation_ended", "remote", c.remote, "err", err)
		}
		return
	}
	_ = c.nc.SetDeadline(time.Time{})
	c.mu.Lock()
	drainNow := c.phase == 2
	if c.phase == 0 {
		c.phase = 1
	}
	c.mu.Unlock()
	if drainNow {
		return
	}
	log.Debug("nbd_transmission_started", "remote", c.remote, "export", c.exp.Name,
		"structured", c.structured, "base_allocation", c.metaAlloc)
	// Every request read is answered (or its reply dropped on a dead
	// socket) before the connection closes.
	reason := c.transmit()
	c.out.stop()
	log.Info("nbd_connection_closed", "remote", c.remote, "export", c.exp.Name, "reason", reason)
}

// drain stops reading new requests; in-flight ones finish and are answered,
// then the connection closes. A connection still negotiating closes now.
func (c *conn) drain(why string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch c.phase {
	case 0:
		c.phase = 2
		c.nc.Close()
	case 1:
		c.phase = 2
		c.draining.Store(true)
		_ = c.nc.SetReadDeadline(time.Now())
		c.srv.log.Info("nbd_connection_draining", "remote", c.remote, "export", c.exp.Name, "reason", why)
	}
}

// abort closes the socket: in-flight requests finish, their replies are lost.
func (c *conn) abort() { c.nc.Close() }

// request is one transmission request and its payload.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	off    uint64
	length uint32
	buf    *[]byte // pooled: WRITE payload or READ destination

	deferFlush bool // executed inline: the reader writes the reply out
}

// transmit serves requests until DISC, a broken stream or a drain, and
// returns why it stopped, once every request read has been answered.
func (c *conn) transmit() string {
	c.readMu.Lock()
	c.nworkers = 1
	c.readMu.Unlock()
	c.workers.Add(1)
	c.worker()
	c.workers.Wait()
	return c.stopReason
}

func (c *conn) worker() {
	defer c.workers.Done()
	locked := false
	for {
		if !locked {
			c.waiting.Add(1)
			c.readMu.Lock()
			c.waiting.Add(-1)
			locked = true
		}
		if c.stopped {
			c.readMu.Unlock()
			c.out.flushDeferred()
			return
		}
		if c.br.Buffered() < wire.RequestSize {
			// The input queue drained: answer everything executed so far
			// before (possibly) waiting for more requests.
			c.out.flushDeferred()
		}
		r, reason := c.readRequest()
		if r != nil && c.out.dead.Load() {
			// Replies can no longer be delivered: the client is gone.
			// Requests still buffered are not executed.
			putBuf(r.buf)
			r, reason = nil, "client gone (reply write failed)"
		}
		if r == nil {
			c.stopped, c.stopReason = true, reason
			c.readMu.Unlock()
			c.out.flushDeferred()
			return
		}
		if c.out.busy.Add(1) == 1 && c.br.Buffered() == 0 {
			c.aloneRun++
		} else {
			c.aloneRun = 0
		}
		if c.inlineOK(r) {
			// Fast request on a fast device: execute it here, keep
			// reading; no hand-off, no wake-up, replies written in one
			// batch when the input drains.
			r.deferFlush = true
			c.timedExec(r)
			continue
		}
		if c.inlineSyncOK(r) {
			r.deferFlush = true
			c.timedExec(r)
			if c.inputWaiting() {
				// A request came while the sync ran: the client has
				// more than one outstanding (two fsync streams on one
				// connection arrive alone by turns), so hand off again.
				c.aloneRun = 0
			}
			continue
		}
		// Possibly slow: let another worker read on while this one
		// executes.
		c.out.flushDeferred()
		if c.waiting.Load() == 0 && c.nworkers < c.srv.maxInFlight {
			c.nworkers++
			c.workers.Add(1)
			go c.worker()
		}
		c.readMu.Unlock()
		locked = false
		c.timedExec(r)
	}
}

// Inline execution: requests expected to be fast (reads and writes of at
// most inlineMaxLen without FUA) run on the reading worker itself while the
// device's recent latency (an EWMA over reads and writes) stays under
// inlineMaxLatency. Anything else, or any request on a slow device, is
// executed while another worker goes on reading. The trade-off: a request
// that was expected fast but turns out slow delays the reading of the
// requests behind it by its own duration, once; its latency then lifts the
// EWMA (one 1 ms request is enough) and the connection hands off again.
// A connection starts in hand-off mode.
const (
	inlineMaxLen     = 64 << 10
	inlineMaxLatency = int64(50 * time.Microsecond)
)

func (c *conn) inlineOK(r *request) bool {
	if r.flags&wire.CmdFlagFUA != 0 || r.length > inlineMaxLen {
		return false
	}
	if r.typ != wire.CmdRead && r.typ != wire.CmdWrite {
		return false
	}
	return c.latency.Load() < inlineMaxLatency
}

// A synchronous client (QD1: each request sent after the previous reply,
// as fio's write+fsync loop or a database's log writer) gains nothing from
// a hand-off: there is no next request to read while a flush or FUA write
// waits for its fdatasync, and the hand-off costs two goroutine wake-ups
// per request (the next reader, then this worker parking on readMu).
// Once inlineSyncRun requests in a row have arrived alone (nothing else
// executing, nothing buffered behind them), flushes and FUA writes up to
// inlineMaxLen run on the reading worker too. One request that arrives
// with company ends the run, and so does a request that came while an
// inline sync ran (two fsync streams on one connection arrive alone by
// turns): so a deeper queue keeps its hand-offs, and at worst one request
// of a client that deepens its queue waits for one sync before it is
// read. Group commit still joins the flushes of many
// connections: the sync's leader is whichever caller comes first.
const inlineSyncRun = 4

func (c *conn) inlineSyncOK(r *request) bool {
	if c.aloneRun < inlineSyncRun {
		return false
	}
	switch r.typ {
	case wire.CmdFlush:
		return true
	case wire.CmdWrite:
		return r.flags&wire.CmdFlagFUA != 0 && r.length <= inlineMaxLen
	}
	return false
}

// inputWaiting reports whether more of the stream has arrived: buffered,
// or in the socket (peeked, not read; a TLS connection's own buffer is
// not seen, which only keeps an inline run going).
func (c *conn) inputWaiting() bool {
	if c.br.Buffered() > 0 {
		return true
	}
	if c.raw == nil {
		return false
	}
	n := 0
	_ = c.raw.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, _ = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return true
	})
	return n > 0
}

func (c *conn) timedExec(r *request) {
	// FUA writes wait for a sync by design: their time says nothing about
	// whether plain reads and writes are fast.
	if (r.typ != wire.CmdRead && r.typ != wire.CmdWrite) || r.flags&wire.CmdFlagFUA != 0 {
		c.exec(r)
		return
	}
	t0 := time.Now()
	c.exec(r)
	d := int64(time.Since(t0))
	l := c.latency.Load()
	c.latency.Store(l + (d-l)/8)
}

// readRequest reads the next executable request (header and payload).
// Requests refused before their payload is buffered are answered here. A
// nil request means the stream ends, for the reason returned.
func (c *conn) readRequest() (*request, string) {
	var hdr [wire.RequestSize]byte
	for {
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return nil, c.readStopReason(err)
		}
		c.fill.limit = 0
		if m := binary.BigEndian.Uint32(hdr[0:]); m != wire.MagicRequest {
			c.srv.log.Warn("nbd_bad_request_magic", "remote", c.remote, "magic", fmt.Sprintf("%#x", m), "action", "closing the connection")
			return nil, "bad request magic"
		}
		r := &request{
			flags:  binary.BigEndian.Uint16(hdr[4:]),
			typ:    binary.BigEndian.Uint16(hdr[6:]),
			handle: binary.BigEndian.Uint64(hdr[8:]),
			off:    binary.BigEndian.Uint64(hdr[16:]),
			length: binary.BigEndian.Uint32(hdr[24:]),
		}
		switch r.typ {
		case wire.CmdDisc:
			return nil, "client disconnect"
		case wire.CmdWrite:
			if r.length > c.srv.maxBlock {
				// Too large to buffer: skip the payload, refuse the request.
				if err := discard(c.br, int64(r.length)); err != nil {
					return nil, c.readStopReason(err)
				}
				c.out.busy.Add(1)
				c.replyError(r, wire.ErrnoOverflow, "write larger than the maximum block size")
				continue
			}
			r.buf = getBuf(int(r.length))
			if err := c.readPayload(*r.buf); err != nil {
				putBuf(r.buf)
				return nil, c.readStopReason(err)
			}
		}
		return r, ""
	}
}

func (c *conn) readStopReason(err error) string {
	if c.draining.Load() {
		return "drained"
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return "client closed the connection"
	}
	if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) {
		return "closed by server"
	}
	return "read error: " + err.Error()
}

// allowed command flags per command.
var allowedFlags = [...]uint16{
	wire.CmdRead:        wire.CmdFlagFUA | wire.CmdFlagDF,
	wire.CmdWrite:       wire.CmdFlagFUA,
	wire.CmdFlush:       wire.CmdFlagFUA,
	wire.CmdTrim:        wire.CmdFlagFUA,
	wire.CmdCache:       wire.CmdFlagFUA,
	wire.CmdWriteZeroes: wire.CmdFlagFUA | wire.CmdFlagNoHole | wire.CmdFlagFastZero,
	wire.CmdBlockStatus: wire.CmdFlagFUA | wire.CmdFlagReqOne,
}

func (c *conn) exec(r *request) {
	if int(r.typ) >= len(allowedFlags) || r.typ == wire.CmdDisc {
		c.replyError(r, wire.ErrnoInval, fmt.Sprintf("unknown command %d", r.typ))
		return
	}
	if r.flags&^allowedFlags[r.typ] != 0 {
		c.replyError(r, wire.ErrnoInval, fmt.Sprintf("command flags %#x not valid for command %d", r.flags, r.typ))
		return
	}
	off, n := int64(r.off), int64(r.length)
	switch r.typ {
	case wire.CmdRead:
		if e, msg := c.checkRange(r, false); e != 0 {
			c.replyError(r, e, msg)
			return
		}
		r.buf = getBuf(int(n))
		if err := c.dev.ReadAt(*r.buf, off); err != nil {
			putBuf(r.buf)
			c.replyDevError(r, "read", err)
			return
		}
		c.replyRead(r)

	case wire.CmdWrite:
		defer putBuf(r.buf)
		if e, msg := c.checkRange(r, true); e != 0 {
			c.replyError(r, e, msg)
			return
		}
		if err := c.dev.WriteAt(*r.buf, off, r.flags&wire.CmdFlagFUA != 0); err != nil {
			c.replyDevError(r, "write", err)
			return
		}
		c.replyOK(r)

	case wire.CmdFlush:
		if err := c.dev.Flush(); err != nil {
			c.replyDevError(r, "flush", err)
			return
		}
		c.replyOK(r)

	case wire.CmdTrim, wire.CmdWriteZeroes:
		if e, msg := c.checkRange(r, true); e != 0 {
			c.replyError(r, e, msg)
			return
		}
		var err error
		if r.typ == wire.CmdTrim {
			err = c.dev.Trim(off, n)
		} else {
			err = c.dev.WriteZeroes(off, n, r.flags&wire.CmdFlagNoHole == 0)
		}
		if err == nil && r.flags&wire.CmdFlagFUA != 0 {
			err = c.dev.Flush()
		}
		if err != nil {
			c.replyDevError(r, cmdName(r.typ), err)
			return
		}
		c.replyOK(r)

	case wire.CmdCache:
		if e, msg := c.checkRange(r, false); e != 0 {
			c.replyError(r, e, msg)
			return
		}
		c.replyOK(r) // reads are served from the engine; nothing to prefetch

	case wire.CmdBlockStatus:
		if !c.structured || (!c.metaAlloc && len(c.metaSel) == 0) {
			c.replyError(r, wire.ErrnoInval, "no metadata context negotiated")
			return
		}
		if n == 0 || off < 0 || r.off > uint64(c.size) || n > c.size-off {
			c.replyError(r, wire.ErrnoInval, "block status range beyond the end of the export")
			return
		}
		c.blockStatus(r, off, n)

	default:
		c.replyError(r, wire.ErrnoInval, fmt.Sprintf("unknown command %d", r.typ))
	}
}

// checkRange validates a data command. Writes beyond the end get ENOSPC,
// other commands beyond the end EINVAL, as the protocol recommends.
func (c *conn) checkRange(r *request, write bool) (uint32, string) {
	if write && c.tflags&wire.FlagReadOnly != 0 {
		return wire.ErrnoPerm, "export is read-only"
	}
	n := uint64(r.length)
	switch {
	case n == 0:
		return wire.ErrnoInval, "zero-length request"
	case r.off%blockdev.SectorSize != 0 || n%blockdev.SectorSize != 0:
		return wire.ErrnoInval, "offset and length must be multiples of 512"
	case (r.typ == wire.CmdRead || r.typ == wire.CmdWrite) && n > uint64(c.srv.maxBlock):
		return wire.ErrnoOverflow, "request larger than the maximum block size"
	case r.off > uint64(c.size) || n > uint64(c.size)-r.off:
		if write {
			return wire.ErrnoNoSpc, "request beyond the end of the export"
		}
		return wire.ErrnoInval, "request beyond the end of the export"
	}
	return 0, ""
}

func cmdName(t uint16) string {
	switch t {
	case wire.CmdRead:
		return "read"
	case wire.CmdWrite:
		return "write"
	case wire.CmdFlush:
		return "flush"
	case wire.CmdTrim:
		return "trim"
	case wire.CmdCache:
		return "cache"
	case wire.CmdWriteZeroes:
		return "write zeroes"
	case wire.CmdBlockStatus:
		return "block status"
	}
	return fmt.Sprintf("command %d", t)
}

// wireErrno maps a device error to one of the errno values the protocol
// allows.
func wireErrno(err error) uint32 {
	if errors.Is(err, blockdev.ErrClosed) {
		return wire.ErrnoShutdown
	}
	switch e := blockdev.Errno(err); e {
	case syscall.EPERM, syscall.EROFS, syscall.EACCES:
		return wire.ErrnoPerm
	case syscall.EINVAL:
		return wire.ErrnoInval
	case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
		return wire.ErrnoNoSpc
	case syscall.EOVERFLOW:
		return wire.ErrnoOverflow
	case syscall.ENOMEM:
		return wire.ErrnoNoMem
	case syscall.ENOTSUP:
		return wire.ErrnoNotSup
	case syscall.ESHUTDOWN:
		return wire.ErrnoShutdown
	default:
		return wire.ErrnoIO
	}
}

func (c *conn) replyDevError(r *request, what string, err error) {
	e := wireErrno(err)
	c.srv.log.Warn("nbd_request_failed", "remote", c.remote, "export", c.exp.Name, "op", what,
		"offset", r.off, "length", r.length, "errno", e, "err", err)
	c.replyError(r, e, sanitize(err.Error()))
}

// replyOK answers a request without payload.
func (c *conn) replyOK(r *request) {
	var h [wire.SimpleReplySize]byte
	binary.BigEndian.PutUint32(h[0:], wire.MagicSimpleReply)
	binary.BigEndian.PutUint64(h[8:], r.handle)
	c.out.send(h[:], nil, nil, r.deferFlush)
}

// replyError answers with an error: a structured error chunk when
// negotiated (it carries a message), else a simple reply without payload.
func (c *conn) replyError(r *request, errno uint32, msg string) {
	c.srv.stats.countError(errno)
	if !c.structured {
		var h [wire.SimpleReplySize]byte
		binary.BigEndian.PutUint32(h[0:], wire.MagicSimpleReply)
		binary.BigEndian.PutUint32(h[4:], errno)
		binary.BigEndian.PutUint64(h[8:], r.handle)
		c.out.send(h[:], nil, nil, r.deferFlush)
		return
	}
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	h := make([]byte, wire.StructuredReplySize+6+len(msg))
	binary.BigEndian.PutUint32(h[0:], wire.MagicStructuredReply)
	binary.BigEndian.PutUint16(h[4:], wire.ReplyFlagDone)
	binary.BigEndian.PutUint16(h[6:], wire.ReplyTypeError)
	binary.BigEndian.PutUint64(h[8:], r.handle)
	binary.BigEndian.PutUint32(h[16:], uint32(6+len(msg)))
	binary.BigEndian.PutUint32(h[20:], errno)
	binary.BigEndian.PutUint16(h[24:], uint16(len(msg)))
	copy(h[26:], msg)
	c.out.send(h, nil, nil, r.deferFlush)
}

// replyRead sends the data of a successful read (r.buf, handed over).
func (c *conn) replyRead(r *request) {
	data := *r.buf
	if !c.structured {
		var h [wire.SimpleReplySize]byte
		binary.BigEndian.PutUint32(h[0:], wire.MagicSimpleReply)
		binary.BigEndian.PutUint64(h[8:], r.handle)
		c.out.send(h[:], data, r.buf, r.deferFlush)
		return
	}
	// One OFFSET_DATA chunk, final: the data is already read, no error can
	// follow, and DF is honoured trivially.
	var h [wire.StructuredReplySize + 8]byte
	binary.BigEndian.PutUint32(h[0:], wire.MagicStructuredReply)
	binary.BigEndian.PutUint16(h[4:], wire.ReplyFlagDone)
	binary.BigEndian.PutUint16(h[6:], wire.ReplyTypeOffsetData)
	binary.BigEndian.PutUint64(h[8:], r.handle)
	binary.BigEndian.PutUint32(h[16:], uint32(8+len(data)))
	binary.BigEndian.PutUint64(h[20:], r.off)
	c.out.send(h[:], data, r.buf, r.deferFlush)
}

// maxStatusDescriptors bounds one BLOCK_STATUS reply.
const maxStatusDescriptors = 1024
