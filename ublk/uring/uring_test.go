package uring

import (
	"encoding/binary"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestLayout(t *testing.T) {
	if got := unsafe.Sizeof(geteventsArg{}); got != 24 {
		t.Fatalf("io_uring_getevents_arg is %d bytes, want 24", got)
	}
	if got := unsafe.Sizeof(params{}); got != paramsSizeBytes {
		t.Fatalf("io_uring_params is %d bytes, want %d", got, paramsSizeBytes)
	}
	if got := unsafe.Sizeof(SQE{}); got != sqeBaseSize {
		t.Fatalf("SQE is %d bytes, want 64", got)
	}
	var s SQE
	base := uintptr(unsafe.Pointer(&s))
	for name, c := range map[string]struct{ got, want uintptr }{
		"fd":        {uintptr(unsafe.Pointer(&s.Fd)) - base, 4},
		"off":       {uintptr(unsafe.Pointer(&s.Off)) - base, 8},
		"addr":      {uintptr(unsafe.Pointer(&s.Addr)) - base, 16},
		"len":       {uintptr(unsafe.Pointer(&s.Len)) - base, 24},
		"user_data": {uintptr(unsafe.Pointer(&s.UserData)) - base, 32},
		"addr3":     {uintptr(unsafe.Pointer(&s.Addr3)) - base, 48},
	} {
		if c.got != c.want {
			t.Errorf("SQE field %s at offset %d, want %d", name, c.got, c.want)
		}
	}
	p := params{sqEntries: 8, cqEntries: 16}
	p.sqOff.array = 64
	p.cqOff.cqes = 64
	sq, cq, sqes := ringSizes(&p, 128, 16)
	if sq != 64+8*4 || cq != 64+16*16 || sqes != 8*128 {
		t.Fatalf("ring sizes %d %d %d", sq, cq, sqes)
	}
}

// newRing skips when the host kernel refuses io_uring (disabled by sysctl
// or seccomp), which is a property of the machine, not of this code.
func newRing(t *testing.T, entries, flags uint32) *Ring {
	t.Helper()
	r, err := New(entries, flags)
	if errors.Is(err, syscall.ENOSYS) || errors.Is(err, syscall.EPERM) {
		t.Skipf("SKIPPED: io_uring unavailable on this host: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func TestNopRoundTrip(t *testing.T) {
	for _, flags := range []uint32{0, SetupSQE128, SetupSQE128 | SetupCQE32} {
		r := newRing(t, 4, flags)
		if r.SQEntries() != 4 {
			t.Fatalf("sq entries %d", r.SQEntries())
		}
		// More rounds than ring slots, to exercise wrap-around.
		for round := 0; round < 5; round++ {
			for i := 0; i < 4; i++ {
				s := r.GetSQE()
				if s == nil {
					t.Fatalf("flags %#x round %d: ring full at %d", flags, round, i)
				}
				s.Opcode = OpNop
				s.UserData = uint64(round*10 + i)
			}
			if r.GetSQE() != nil {
				t.Fatalf("GetSQE succeeded on a full ring")
			}
			n, err := r.Submit(4)
			if err != nil || n != 4 {
				t.Fatalf("submit: %d %v", n, err)
			}
			for i := 0; i < 4; i++ {
				c, err := r.WaitCQE()
				if err != nil {
					t.Fatal(err)
				}
				if c.UserData != uint64(round*10+i) || c.Res != 0 {
					t.Fatalf("cqe %+v, want user data %d", c, round*10+i)
				}
			}
			if r.Ready() != 0 {
				t.Fatalf("%d completions left", r.Ready())
			}
		}
	}
}

// prepEventfdRead prepares an 8-byte IORING_OP_READ of a new eventfd into
// a new mmapped buffer (both released when the test ends).
func prepEventfdRead(t *testing.T, r *Ring, userData uint64) (int, []byte) {
	t.Helper()
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(efd) })
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(buf) })
	s := r.GetSQE()
	s.Opcode = OpRead
	s.Fd = int32(efd)
	s.Addr = uint64(uintptr(unsafe.Pointer(&buf[0])))
	s.Len = 8
	s.UserData = userData
	return efd, buf
}

// TestReadWakeup is the pattern the ublk queue loop uses to be woken by
// worker goroutines: an IORING_OP_READ on an eventfd.
func TestReadWakeup(t *testing.T) {
	r := newRing(t, 8, SetupSQE128)
	efd, buf := prepEventfdRead(t, r, 77)
	if _, err := r.Submit(0); err != nil {
		t.Fatal(err)
	}
	go func() {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], 3)
		unix.Write(efd, b[:])
	}()
	c, err := r.WaitCQE()
	if err != nil {
		t.Fatal(err)
	}
	if c.UserData != 77 || c.Res != 8 || binary.LittleEndian.Uint64(buf) != 3 {
		t.Fatalf("cqe %+v value %d", c, binary.LittleEndian.Uint64(buf))
	}
}

// TestWaitCQETimeout: a read of an empty eventfd does not complete, so the
// bounded wait returns ErrTimeout instead of blocking; once the eventfd is
// written, the same read completes.
func TestWaitCQETimeout(t *testing.T) {
	r := newRing(t, 8, SetupSQE128)
	efd, buf := prepEventfdRead(t, r, 9)
	t0 := time.Now()
	if _, err := r.WaitCQETimeout(50 * time.Millisecond); !errors.Is(err, ErrTimeout) {
		t.Fatalf("wait on a read that cannot complete: %v, want ErrTimeout", err)
	}
	t.Logf("timed out after %v", time.Since(t0))
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], 5)
	if _, err := unix.Write(efd, b[:]); err != nil {
		t.Fatal(err)
	}
	c, err := r.WaitCQETimeout(time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if c.UserData != 9 || c.Res != 8 || binary.LittleEndian.Uint64(buf) != 5 {
		t.Fatalf("cqe %+v value %d", c, binary.LittleEndian.Uint64(buf))
	}
}

// TestURingCmdOnRegularFile checks the URING_CMD encoding reaches the
// kernel: a regular file has no uring_cmd handler and the kernel answers
// -EOPNOTSUPP (or EBADF/EINVAL on older kernels) instead of crashing or
// hanging.
func TestURingCmdOnRegularFile(t *testing.T) {
	r := newRing(t, 2, SetupSQE128)
	f, err := os.CreateTemp(t.TempDir(), "f")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	s := r.GetSQE()
	s.Opcode = OpURingCmd
	s.Fd = int32(f.Fd())
	s.SetCmdOp(0xc0107520)
	cmd := r.Cmd(s)
	if len(cmd) != 80 {
		t.Fatalf("cmd area %d bytes, want 80", len(cmd))
	}
	cmd[0] = 1
	s.UserData = 5
	c, err := r.WaitCQE()
	if err != nil {
		t.Fatal(err)
	}
	if c.UserData != 5 || c.Res >= 0 {
		t.Fatalf("URING_CMD on a regular file: %+v, want an error", c)
	}
	t.Logf("kernel answered %v", syscall.Errno(-c.Res))
}
