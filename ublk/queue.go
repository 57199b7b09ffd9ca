package ublk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/blockd/blockd/ublk/uring"
	"golang.org/x/sys/unix"
)

// Data copy: this package uses the driver's default mode, a per-tag buffer
// whose address travels in the FETCH_REQ / COMMIT_AND_FETCH_REQ command.
// The driver copies WRITE data into it before handing the request over and
// copies READ data out of it when the result is committed, in the context
// of the queue's thread. It needs no extra system call per request, unlike
// UBLK_F_USER_COPY (a pread/pwrite on /dev/ublkcN per request), and the
// buffers are anonymous mmaps, so the Go garbage collector never sees
// or moves them.

var errStopped = errors.New("ublk: queue stopped")

// ringFlags for the queue rings. Deliberately not DEFER_TASKRUN: with it
// the driver's hand-over task work sits on the ring's local list, and in
// the guest (6.12) a planned Release could leave a request there when the
// ring went away; the driver's quiesce then waited for it forever and
// START_USER_RECOVERY hung on the device mutex. Plain task work falls back
// to a kernel worker (which requeues the request) once the thread is gone.
var ringFlags uint32 = uring.SetupSQE128

// wakeTag marks the eventfd read in user_data; I/O commands carry the tag.
const wakeTag = 1 << 32

type completion struct {
	tag uint16
	res int32
}

// queue is one hardware queue: its own io_uring on /dev/ublkcN, driven by
// one goroutine locked to one OS thread (the driver only accepts a queue's
// commands from the task that fetched them). Requests are executed by
// worker goroutines, so up to depth requests are in flight at once; their
// results come back through done and an eventfd the queue thread reads
// through its own ring.
type queue struct {
	dev   *Device
	id    int
	depth int
	bufSz int

	ring  *uring.Ring
	descs []byte // mmapped descriptor array (read-only)
	bufs  []byte // depth * bufSz, anonymous mmap
	efd   int
	wbuf  []byte // 8-byte target of the eventfd read (mmapped)

	mu       sync.Mutex
	done     []completion
	stopping atomic.Bool
	// sleeping is set while the queue thread waits in io_uring_enter;
	// workers write the eventfd only then (one system call saved per
	// request while the thread is busy anyway).
	sleeping atomic.Bool

	workersUntil time.Time // InlineAuto: no inline execution before this

	exited chan struct{}
	err    error // why the loop ended (nil: all tags aborted by the driver)
	tid    int   // the locked OS thread's id (the driver's queue task)
	// kept is the ring of a loop stopped by this process (errStopped),
	// left open so that the Device closes it once the thread is gone
	// (Device.closeKeptRings says why).
	kept *uring.Ring
}

func newQueue(d *Device, id int) *queue {
	return &queue{dev: d, id: id, depth: int(d.info.QueueDepth), bufSz: int(d.info.MaxIOBufBytes), efd: -1, exited: make(chan struct{})}
}

func (q *queue) log() *slog.Logger { return q.dev.log }

// setup maps the queue's memory and creates its ring. Called on the
// queue's own thread.
func (q *queue) setup() error {
	ps := os.Getpagesize()
	var err error
	q.descs, err = unix.Mmap(q.dev.charFd, descArrayOffset(q.id, ps), descArraySize(q.depth, ps), unix.PROT_READ, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("ublk: queue %d: mmap descriptors: %w", q.id, err)
	}
	q.bufs, err = unix.Mmap(-1, 0, q.depth*q.bufSz+ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return fmt.Errorf("ublk: queue %d: I/O buffers: %w", q.id, err)
	}
	q.wbuf = q.bufs[q.depth*q.bufSz : q.depth*q.bufSz+8]
	q.efd, err = unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("ublk: queue %d: eventfd: %w", q.id, err)
	}
	entries := uint32(1)
	for entries < uint32(q.depth+2) {
		entries <<= 1
	}
	q.ring, err = uring.New(entries, ringFlags)
	if err != nil {
		return fmt.Errorf("ublk: queue %d: ring: %w", q.id, err)
	}
	return nil
}

func (q *queue) teardown() {
	if q.ring != nil {
		q.ring.Close()
		q.ring = nil
	}
	if q.descs != nil {
		unix.Munmap(q.descs)
		q.descs = nil
	}
	if q.efd >= 0 {
		unix.Close(q.efd)
		q.efd = -1
	}
	// bufs are unmapped by the Device once no worker can touch them.
}

func (q *queue) buf(tag uint16) []byte {
	o := int(tag) * q.bufSz
	return q.bufs[o : o+q.bufSz : o+q.bufSz]
}

func (q *queue) prepIO(op uint32, tag uint16, res int32) bool {
	sqe := q.ring.GetSQE()
	if sqe == nil {
		return false
	}
	sqe.Opcode = uring.OpURingCmd
	sqe.Fd = int32(q.dev.charFd)
	sqe.SetCmdOp(op)
	sqe.UserData = uint64(tag)
	ioCmd{qid: uint16(q.id), tag: tag, result: res, addr: uint64(uintptr(unsafe.Pointer(&q.buf(tag)[0])))}.encode(q.ring.Cmd(sqe))
	return true
}

func (q *queue) prepWake() bool {
	sqe := q.ring.GetSQE()
	if sqe == nil {
		return false
	}
	sqe.Opcode = uring.OpRead
	sqe.Fd = int32(q.efd)
	sqe.Addr = uint64(uintptr(unsafe.Pointer(&q.wbuf[0])))
	sqe.Len = 8
	sqe.UserData = wakeTag
	return true
}

// wake interrupts the queue thread's wait.
func (q *queue) wake() {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], 1)
	for {
		_, err := unix.Write(q.efd, b[:])
		if err != unix.EINTR {
			return
		}
	}
}

// complete is called by workers.
func (q *queue) complete(tag uint16, res int32) {
	q.mu.Lock()
	q.done = append(q.done, completion{tag, res})
	q.mu.Unlock()
	// Paired with the store-then-check in loop: either the thread sees
	// this completion before sleeping, or this load sees it asleep.
	if q.sleeping.CompareAndSwap(true, false) {
		q.wake()
	}
}

// stop asks the loop to exit without waiting for the driver: used on
// errors before START_DEV and by Release (leave the device for recovery).
func (q *queue) stop() {
	q.stopping.Store(true)
	if q.efd >= 0 {
		q.wake()
	}
}

// run is the queue loop. ready receives the setup result once every tag
// has been fetched (the driver then counts the queue as ready).
func (q *queue) run(ready chan<- error) {
	// Started by goLocked: never unlocked, and not the main thread, so
	// when the loop ends the thread ends with it and no other goroutine
	// ever runs on the task the driver bound to this queue.
	q.tid = unix.Gettid()
	defer close(q.exited)
	if err := q.setup(); err != nil {
		q.teardown()
		q.err = err
		ready <- err
		return
	}
	for tag := 0; tag < q.depth; tag++ {
		q.prepIO(ioFetchReq, uint16(tag), -1)
	}
	q.prepWake()
	if _, err := q.ring.Submit(0); err != nil {
		q.teardown()
		q.err = fmt.Errorf("ublk: queue %d: FETCH_REQ: %w", q.id, err)
		ready <- q.err
		return
	}
	// A FETCH_REQ the driver refuses completes at once with an error.
	// Only the head is peeked (not consumed): before START_DEV no request
	// can complete a FETCH_REQ, so a completion here is a refusal or the
	// wake; loop() consumes whatever is there.
	if q.ring.Ready() > 0 {
		c, _ := q.ring.PeekCQE()
		if c.UserData != wakeTag && c.Res < 0 {
			q.teardown()
			q.err = fmt.Errorf("ublk: queue %d: FETCH_REQ tag %d: %w", q.id, c.UserData, mapCtrlErr(syscall.Errno(-c.Res)))
			ready <- q.err
			return
		}
	}
	ready <- nil
	q.err = q.loop()
	if errors.Is(q.err, errStopped) {
		q.kept, q.ring = q.ring, nil
	}
	q.teardown()
	q.log().Debug("ublk_queue_exit", "dev", q.dev.info.DevID, "queue", q.id, "err", q.err)
}

func (q *queue) loop() error {
	inKernel := q.depth // tags with a command owned by the driver
	inWorker := 0       // tags being executed by a worker
	wakeArmed := true
	var batch []completion
	for {
		if q.stopping.Load() && inWorker == 0 {
			// Hand the last results to the driver before the ring goes.
			if q.ring.Unsubmitted() > 0 {
				q.ring.Submit(0)
			}
			return errStopped
		}
		if inKernel == 0 && inWorker == 0 {
			return nil // every tag aborted: the device was stopped
		}
		wait := uint32(1)
		q.sleeping.Store(true)
		q.mu.Lock()
		if len(q.done) > 0 {
			wait = 0
		}
		q.mu.Unlock()
		_, err := q.ring.Submit(wait)
		q.sleeping.Store(false)
		if err != nil {
			return fmt.Errorf("ublk: queue %d: %w", q.id, err)
		}
		for {
			c, ok := q.ring.PeekCQE()
			if !ok {
				break
			}
			q.ring.SeenCQE()
			if c.UserData == wakeTag {
				wakeArmed = false
				if c.Res < 0 && c.Res != -int32(unix.EINTR) && c.Res != -int32(unix.EAGAIN) {
					return fmt.Errorf("ublk: queue %d: eventfd read: %w", q.id, syscall.Errno(-c.Res))
				}
				continue
			}
			tag := uint16(c.UserData)
			inKernel--
			switch {
			case c.Res == 0: // UBLK_IO_RES_OK: a request for this tag
				inWorker++
				d := decodeIODesc(q.descs[int(tag)*ioDescSize:])
				q.dispatch(tag, d)
			case c.Res == ioResAbort:
				// The driver will not hand this tag out again (STOP_DEV,
				// or the queue is being torn down).
			default:
				q.log().Error("ublk_queue_cmd_failed", "dev", q.dev.info.DevID, "queue", q.id, "tag", tag, "err", syscall.Errno(-c.Res))
			}
		}
		if !wakeArmed {
			wakeArmed = q.prepWake()
		}
		q.mu.Lock()
		batch, q.done = q.done, batch[:0]
		q.mu.Unlock()
		for i, c := range batch {
			if !q.prepIO(ioCommitAndFetchReq, c.tag, c.res) {
				// Cannot happen with entries >= depth+2; keep the rest.
				q.mu.Lock()
				q.done = append(q.done, batch[i:]...)
				q.mu.Unlock()
				break
			}
			inWorker--
			inKernel++
		}
	}
}

// slowInline is how long a request run on the queue thread may take before
// the queue hands everything to workers for inlineBackoff.
const (
	slowInline    = 200 * time.Microsecond
	inlineBackoff = time.Second
)

// dispatch runs a request. By default (InlineNever) on a worker goroutine.
// With InlineAuto, reads and plain writes run on the queue thread
// while the device answers them quickly (page-cache hits, a write into the
// WAL): handing a request to another thread and waking this one again
// costs more than such a request itself. Anything that may wait (flush,
// FUA writes, discard, write-zeroes) goes to a worker goroutine, and so
// does everything for a while after an inline request turned out slow, so
// a backend that blocks keeps up to depth requests in flight per queue.
func (q *queue) dispatch(tag uint16, d ioDesc) {
	mode := q.dev.inline
	if mode == InlineAlways || (mode == InlineAuto && inlineEligible(d) && !q.now().Before(q.workersUntil)) {
		start := q.now()
		q.work(tag, d)
		if el := q.now().Sub(start); mode == InlineAuto && el > slowInline {
			q.workersUntil = q.now().Add(inlineBackoff)
			q.log().Debug("ublk_queue_inline_backoff", "dev", q.dev.info.DevID, "queue", q.id, "op", opName(d.op()), "took", el)
		}
		return
	}
	go q.work(tag, d)
}

func inlineEligible(d ioDesc) bool {
	return d.op() == opRead || (d.op() == opWrite && d.flags()&ioFlagFUA == 0)
}

func (q *queue) now() time.Time { return time.Now() }

func (q *queue) work(tag uint16, d ioDesc) {
	q.dev.stats.inFlight.Add(1)
	res, err := execute(q.dev.dev, d, q.buf(tag))
	q.dev.stats.inFlight.Add(-1)
	if err != nil {
		q.dev.ioErrors.Add(1)
		q.dev.stats.countError(res)
		q.log().Warn("ublk_io_error", "dev", q.dev.info.DevID, "queue", q.id, "tag", tag, "op", opName(d.op()),
			"offset", int64(d.startSector)*512, "length", int64(d.nrSectors)*512, "errno", -res, "err", err)
	}
	q.complete(tag, res)
}
