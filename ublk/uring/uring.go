// Package uring is a minimal io_uring built directly on the system calls
// (golang.org/x/sys/unix): ring setup with optional 128-byte SQEs and 32-byte
// CQEs, mmap of the submission and completion rings and the SQE array, SQE
// preparation, io_uring_enter and completion reaping. It exists because the
// ublk driver needs IORING_OP_URING_CMD with 128-byte SQEs, which no library
// available to this project supports.
//
// A Ring is not safe for concurrent use: one goroutine (for ublk queues, one
// locked OS thread) owns it.
package uring

import (
	"errors"
	"fmt"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Setup flags (include/uapi/linux/io_uring.h).
const (
	SetupCoopTaskrun  = 1 << 8  // IORING_SETUP_COOP_TASKRUN
	SetupSQE128       = 1 << 10 // IORING_SETUP_SQE128
	SetupCQE32        = 1 << 11 // IORING_SETUP_CQE32
	SetupSingleIssuer = 1 << 12 // IORING_SETUP_SINGLE_ISSUER
	SetupDeferTaskrun = 1 << 13 // IORING_SETUP_DEFER_TASKRUN (needs SINGLE_ISSUER)
)

// Opcodes used by this project.
const (
	OpNop      = 0  // IORING_OP_NOP
	OpRead     = 22 // IORING_OP_READ
	OpWrite    = 23 // IORING_OP_WRITE
	OpURingCmd = 46 // IORING_OP_URING_CMD
)

const (
	featSingleMmap  = 1 << 0 // IORING_FEAT_SINGLE_MMAP
	enterGetEvents  = 1 << 0 // IORING_ENTER_GETEVENTS
	enterExtArg     = 1 << 3 // IORING_ENTER_EXT_ARG (Linux >= 5.11)
	offSQRing       = 0
	offCQRing       = 0x8000000
	offSQEs         = 0x10000000
	sqeBaseSize     = 64
	cqeBaseSize     = 16
	cmdOffsetInSQE  = 48
	paramsSizeBytes = 120
)

// params mirrors struct io_uring_params (120 bytes).
type params struct {
	sqEntries    uint32
	cqEntries    uint32
	flags        uint32
	sqThreadCPU  uint32
	sqThreadIdle uint32
	features     uint32
	wqFd         uint32
	resv         [3]uint32
	sqOff        sqringOffsets
	cqOff        cqringOffsets
}

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

// SQE is the first 64 bytes of a submission queue entry (struct
// io_uring_sqe). With SetupSQE128 the entry is followed by 64 more bytes,
// reachable through Cmd.
type SQE struct {
	Opcode      uint8
	Flags       uint8
	Ioprio      uint16
	Fd          int32
	Off         uint64 // also cmd_op (low 32 bits) for URING_CMD
	Addr        uint64
	Len         uint32
	OpFlags     uint32
	UserData    uint64
	BufIndex    uint16
	Personality uint16
	SpliceFdIn  int32
	Addr3       uint64
	pad2        uint64
}

// SetCmdOp stores a URING_CMD operation code (the sqe->cmd_op field).
func (s *SQE) SetCmdOp(op uint32) { s.Off = uint64(op) }

// CQE is a completion queue entry.
type CQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
	// Big holds the extra 16 bytes of a 32-byte CQE (SetupCQE32 only).
	Big [2]uint64
}

// Ring is one io_uring instance.
type Ring struct {
	fd      int
	flags   uint32
	sqeSize int
	cqeSize int

	ringMem []byte // SQ ring (and CQ ring with single mmap)
	cqMem   []byte // CQ ring when mapped separately, else nil
	sqeMem  []byte

	sqHead    *uint32
	sqTail    *uint32
	sqMask    uint32
	sqEntries uint32
	sqArray   unsafe.Pointer

	cqHead    *uint32
	cqTail    *uint32
	cqMask    uint32
	cqEntries uint32
	cqes      unsafe.Pointer

	tail uint32 // local SQ tail: SQEs prepared, published on Submit

	// wait is the argument of a bounded io_uring_enter; it lives in the
	// (heap-allocated, never moved) Ring because the kernel follows the
	// timespec pointer stored inside it.
	wait struct {
		arg geteventsArg
		ts  unix.Timespec
	}
}

// geteventsArg is struct io_uring_getevents_arg.
type geteventsArg struct {
	sigmask   uint64
	sigmaskSz uint32
	minWait   uint32
	ts        uint64
}

// ErrTimeout is returned by WaitCQETimeout when no completion arrived in
// time (the operations stay in flight).
var ErrTimeout = errors.New("uring: no completion before the timeout")

// ErrRingFull is returned by GetSQE's callers when no SQE is free.
var ErrRingFull = errors.New("uring: submission queue full")

// New sets up a ring with at least entries submission entries. flags may
// include SetupSQE128 and SetupCQE32.
func New(entries uint32, flags uint32) (*Ring, error) {
	if entries == 0 {
		return nil, fmt.Errorf("uring: zero entries")
	}
	var p params
	p.flags = flags
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("uring: io_uring_setup(%d, flags %#x): %w", entries, flags, errno)
	}
	r := &Ring{fd: int(fd), flags: flags, sqeSize: sqeBaseSize, cqeSize: cqeBaseSize}
	if flags&SetupSQE128 != 0 {
		r.sqeSize = 2 * sqeBaseSize
	}
	if flags&SetupCQE32 != 0 {
		r.cqeSize = 2 * cqeBaseSize
	}
	if err := r.mapRings(&p); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// RingSizes returns the byte sizes of the SQ ring, the CQ ring and the SQE
// array that a ring with these parameters maps. Exposed for tests.
func ringSizes(p *params, sqeSize, cqeSize int) (sq, cq, sqes int) {
	sq = int(p.sqOff.array) + int(p.sqEntries)*4
	cq = int(p.cqOff.cqes) + int(p.cqEntries)*cqeSize
	sqes = int(p.sqEntries) * sqeSize
	return
}

func (r *Ring) mapRings(p *params) error {
	sqSize, cqSize, sqesSize := ringSizes(p, r.sqeSize, r.cqeSize)
	single := p.features&featSingleMmap != 0
	if single && cqSize > sqSize {
		sqSize = cqSize
	}
	var err error
	r.ringMem, err = unix.Mmap(r.fd, offSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("uring: mmap SQ ring: %w", err)
	}
	cqBase := r.ringMem
	if !single {
		r.cqMem, err = unix.Mmap(r.fd, offCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		if err != nil {
			return fmt.Errorf("uring: mmap CQ ring: %w", err)
		}
		cqBase = r.cqMem
	}
	r.sqeMem, err = unix.Mmap(r.fd, offSQEs, sqesSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("uring: mmap SQEs: %w", err)
	}
	sq := unsafe.Pointer(&r.ringMem[0])
	r.sqHead = (*uint32)(unsafe.Add(sq, p.sqOff.head))
	r.sqTail = (*uint32)(unsafe.Add(sq, p.sqOff.tail))
	r.sqMask = *(*uint32)(unsafe.Add(sq, p.sqOff.ringMask))
	r.sqEntries = *(*uint32)(unsafe.Add(sq, p.sqOff.ringEntries))
	r.sqArray = unsafe.Add(sq, p.sqOff.array)
	cq := unsafe.Pointer(&cqBase[0])
	r.cqHead = (*uint32)(unsafe.Add(cq, p.cqOff.head))
	r.cqTail = (*uint32)(unsafe.Add(cq, p.cqOff.tail))
	r.cqMask = *(*uint32)(unsafe.Add(cq, p.cqOff.ringMask))
	r.cqEntries = *(*uint32)(unsafe.Add(cq, p.cqOff.ringEntries))
	r.cqes = unsafe.Add(cq, p.cqOff.cqes)
	// Identity mapping of the indirection array: slot i holds SQE i.
	for i := uint32(0); i < r.sqEntries; i++ {
		*(*uint32)(unsafe.Add(r.sqArray, 4*i)) = i
	}
	r.tail = atomic.LoadUint32(r.sqTail)
	return nil
}

// Fd returns the ring's file descriptor.
func (r *Ring) Fd() int { return r.fd }

// SQEntries and CQEntries report the ring sizes the kernel chose.
func (r *Ring) SQEntries() uint32 { return r.sqEntries }

// CQEntries reports the completion ring size.
func (r *Ring) CQEntries() uint32 { return r.cqEntries }

// SQESize is 64, or 128 with SetupSQE128.
func (r *Ring) SQESize() int { return r.sqeSize }

// GetSQE returns a zeroed SQE to fill, or nil when the submission queue is
// full. The entry is handed to the kernel by the next Submit.
func (r *Ring) GetSQE() *SQE {
	head := atomic.LoadUint32(r.sqHead)
	if r.tail-head >= r.sqEntries {
		return nil
	}
	idx := r.tail & r.sqMask
	b := r.sqeMem[int(idx)*r.sqeSize : int(idx+1)*r.sqeSize]
	clear(b)
	r.tail++
	return (*SQE)(unsafe.Pointer(&b[0]))
}

// Cmd returns the command area of a URING_CMD SQE: 16 bytes for a 64-byte
// SQE, 80 bytes for a 128-byte one, starting at SQE offset 48.
func (r *Ring) Cmd(s *SQE) []byte {
	return unsafe.Slice((*byte)(unsafe.Add(unsafe.Pointer(s), cmdOffsetInSQE)), r.sqeSize-cmdOffsetInSQE)
}

// Submit publishes the prepared SQEs and calls io_uring_enter, waiting for
// at least waitNr completions when waitNr > 0. It returns the number of
// SQEs the kernel consumed. EINTR is retried.
func (r *Ring) Submit(waitNr uint32) (int, error) {
	atomic.StoreUint32(r.sqTail, r.tail)
	toSubmit := r.tail - atomic.LoadUint32(r.sqHead)
	var flags uintptr
	if waitNr > 0 {
		flags |= enterGetEvents
	}
	for {
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(waitNr), flags, 0, 0)
		if errno == syscall.EINTR {
			// Whatever was consumed stays consumed; recompute.
			toSubmit = r.tail - atomic.LoadUint32(r.sqHead)
			if waitNr > 0 && r.Ready() > 0 {
				return int(n), nil
			}
			continue
		}
		if errno != 0 {
			return 0, fmt.Errorf("uring: io_uring_enter: %w", errno)
		}
		return int(n), nil
	}
}

// Unsubmitted returns how many prepared SQEs the kernel has not consumed.
func (r *Ring) Unsubmitted() uint32 { return r.tail - atomic.LoadUint32(r.sqHead) }

// Ready returns the number of completions waiting to be reaped.
func (r *Ring) Ready() uint32 {
	return atomic.LoadUint32(r.cqTail) - atomic.LoadUint32(r.cqHead)
}

// PeekCQE returns the oldest completion without consuming it.
func (r *Ring) PeekCQE() (CQE, bool) {
	head := atomic.LoadUint32(r.cqHead)
	if head == atomic.LoadUint32(r.cqTail) {
		return CQE{}, false
	}
	p := unsafe.Add(r.cqes, uintptr(head&r.cqMask)*uintptr(r.cqeSize))
	c := CQE{
		UserData: *(*uint64)(p),
		Res:      *(*int32)(unsafe.Add(p, 8)),
		Flags:    *(*uint32)(unsafe.Add(p, 12)),
	}
	if r.cqeSize == 2*cqeBaseSize {
		c.Big[0] = *(*uint64)(unsafe.Add(p, 16))
		c.Big[1] = *(*uint64)(unsafe.Add(p, 24))
	}
	return c, true
}

// SeenCQE consumes the oldest completion.
func (r *Ring) SeenCQE() {
	atomic.StoreUint32(r.cqHead, atomic.LoadUint32(r.cqHead)+1)
}

// WaitCQE submits pending SQEs and waits until a completion is available,
// then returns and consumes it.
func (r *Ring) WaitCQE() (CQE, error) {
	for {
		if c, ok := r.PeekCQE(); ok {
			r.SeenCQE()
			return c, nil
		}
		if _, err := r.Submit(1); err != nil {
			return CQE{}, err
		}
	}
}

// WaitCQETimeout is WaitCQE bounded by d: it submits pending SQEs and
// returns ErrTimeout if no completion is available within d. An operation
// still in flight then completes later (or is cancelled when the ring is
// closed).
func (r *Ring) WaitCQETimeout(d time.Duration) (CQE, error) {
	deadline := time.Now().Add(d)
	for {
		if c, ok := r.PeekCQE(); ok {
			r.SeenCQE()
			return c, nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			return CQE{}, ErrTimeout
		}
		atomic.StoreUint32(r.sqTail, r.tail)
		toSubmit := r.tail - atomic.LoadUint32(r.sqHead)
		r.wait.ts = unix.NsecToTimespec(left.Nanoseconds())
		r.wait.arg = geteventsArg{ts: uint64(uintptr(unsafe.Pointer(&r.wait.ts)))}
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), 1,
			enterGetEvents|enterExtArg, uintptr(unsafe.Pointer(&r.wait.arg)), unsafe.Sizeof(r.wait.arg))
		switch errno {
		case 0, syscall.EINTR, syscall.ETIME:
		default:
			return CQE{}, fmt.Errorf("uring: io_uring_enter: %w", errno)
		}
	}
}

// Close unmaps the rings and closes the descriptor; the kernel cancels
// whatever is still in flight.
func (r *Ring) Close() error {
	var first error
	for _, m := range [][]byte{r.sqeMem, r.cqMem, r.ringMem} {
		if m != nil {
			if err := unix.Munmap(m); err != nil && first == nil {
				first = err
			}
		}
	}
	r.sqeMem, r.cqMem, r.ringMem = nil, nil, nil
	if r.fd >= 0 {
		if err := unix.Close(r.fd); err != nil && first == nil {
			first = err
		}
		r.fd = -1
	}
	return first
}
