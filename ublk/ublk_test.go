package ublk

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/blockd/blockd/blockdev"
)

func TestOpcodes(t *testing.T) {
	// Values verified against the Debian 6.12 kernel (tests/vm/README.md) and
	// include/uapi/linux/ublk_cmd.h.
	for name, c := range map[string]struct{ got, want uint32 }{
		"ADD_DEV":             {cmdAddDev, 0xc0207504},
		"DEL_DEV":             {cmdDelDev, 0xc0207505},
		"START_DEV":           {cmdStartDev, 0xc0207506},
		"STOP_DEV":            {cmdStopDev, 0xc0207507},
		"SET_PARAMS":          {cmdSetParams, 0xc0207508},
		"GET_DEV_INFO":        {cmdGetDevInfo, 0x80207502},
		"START_USER_RECOVERY": {cmdStartUserRecovery, 0xc0207510},
		"END_USER_RECOVERY":   {cmdEndUserRecovery, 0xc0207511},
		"GET_FEATURES":        {cmdGetFeatures, 0x80207513},
		"DEL_DEV_ASYNC":       {cmdDelDevAsync, 0x80207514},
		"FETCH_REQ":           {ioFetchReq, 0xc0107520},
		"COMMIT_AND_FETCH":    {ioCommitAndFetchReq, 0xc0107521},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", name, c.got, c.want)
		}
	}
}

func TestEncodings(t *testing.T) {
	b := make([]byte, 64)
	ctrlCmd{devID: 7, queueID: 0xffff, length: 64, addr: 0x1122334455667788, data: 99}.encode(b)
	if binary.LittleEndian.Uint32(b) != 7 || binary.LittleEndian.Uint16(b[4:]) != 0xffff ||
		binary.LittleEndian.Uint16(b[6:]) != 64 || binary.LittleEndian.Uint64(b[8:]) != 0x1122334455667788 ||
		binary.LittleEndian.Uint64(b[16:]) != 99 {
		t.Fatalf("ctrl cmd encoding % x", b[:32])
	}
	in := DevInfo{NrHWQueues: 2, QueueDepth: 128, State: StateLive, MaxIOBufBytes: 1 << 20, DevID: 3, ServerPID: 42, Flags: 0x58}
	in.encode(b)
	if out := decodeDevInfo(b); out != in {
		t.Fatalf("dev info round trip: %+v != %+v", out, in)
	}
	if binary.LittleEndian.Uint64(b[24:]) != 0x58 || binary.LittleEndian.Uint32(b[12:]) != 3 {
		t.Fatalf("dev info layout % x", b)
	}
	ioCmd{qid: 1, tag: 513, result: -5, addr: 0xdeadbeef000}.encode(b)
	if binary.LittleEndian.Uint16(b) != 1 || binary.LittleEndian.Uint16(b[2:]) != 513 ||
		int32(binary.LittleEndian.Uint32(b[4:])) != -5 || binary.LittleEndian.Uint64(b[8:]) != 0xdeadbeef000 {
		t.Fatalf("io cmd encoding % x", b[:16])
	}
	var desc [24]byte
	binary.LittleEndian.PutUint32(desc[0:], opWrite|ioFlagFUA)
	binary.LittleEndian.PutUint32(desc[4:], 8)
	binary.LittleEndian.PutUint64(desc[8:], 1000)
	d := decodeIODesc(desc[:])
	if d.op() != opWrite || d.flags()&ioFlagFUA == 0 || d.nrSectors != 8 || d.startSector != 1000 {
		t.Fatalf("desc %+v", d)
	}
	pb := make([]byte, 128)
	params{attrs: attrVolatileCache | attrFUA, logicalBSShift: 12, physicalBSShift: 12, maxSectors: 1024,
		devSectors: 2048, discardGranularity: 4096, maxDiscardSectors: 8, maxWriteZeroesSectors: 8, maxDiscardSegments: 1}.encode(pb)
	if binary.LittleEndian.Uint32(pb) != 60 || binary.LittleEndian.Uint32(pb[4:]) != 3 ||
		binary.LittleEndian.Uint32(pb[8:]) != 0xc || pb[12] != 12 || pb[13] != 12 ||
		binary.LittleEndian.Uint32(pb[16:]) != 1024 || binary.LittleEndian.Uint64(pb[24:]) != 2048 ||
		binary.LittleEndian.Uint32(pb[44:]) != 4096 || binary.LittleEndian.Uint16(pb[56:]) != 1 {
		t.Fatalf("params encoding % x", pb[:60])
	}
	// Queue q's descriptors live at q * round_up(4096*24, page).
	if off := descArrayOffset(2, 4096); off != 2*98304 {
		t.Fatalf("desc offset %d", off)
	}
	if sz := descArraySize(64, 4096); sz != 4096 {
		t.Fatalf("desc size %d", sz)
	}
}

// memDev is an in-memory blockdev.Device that records calls; it stands in
// for the engine only to check the op mapping, which needs no kernel.
type memDev struct {
	mu    sync.Mutex
	data  []byte
	calls []string
	fail  error
}

func (m *memDev) Size() int64    { return int64(len(m.data)) }
func (m *memDev) BlockSize() int { return 4096 }
func (m *memDev) rec(s string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, s)
	return m.fail
}
func (m *memDev) ReadAt(p []byte, off int64) error {
	if err := m.rec(fmt.Sprintf("read %d %d", off, len(p))); err != nil {
		return err
	}
	copy(p, m.data[off:])
	return nil
}
func (m *memDev) WriteAt(p []byte, off int64, fua bool) error {
	if err := m.rec(fmt.Sprintf("write %d %d %v", off, len(p), fua)); err != nil {
		return err
	}
	copy(m.data[off:], p)
	return nil
}
func (m *memDev) Flush() error            { return m.rec("flush") }
func (m *memDev) Trim(off, n int64) error { return m.rec(fmt.Sprintf("trim %d %d", off, n)) }
func (m *memDev) WriteZeroes(off, n int64, punch bool) error {
	return m.rec(fmt.Sprintf("zero %d %d %v", off, n, punch))
}
func (m *memDev) BlockStatus(off, n int64) ([]blockdev.Extent, error) { return nil, nil }

func desc(op uint8, flags uint32, sector uint64, n uint32) ioDesc {
	return ioDesc{opFlags: uint32(op) | flags, startSector: sector, nrSectors: n}
}

func TestExecuteMapping(t *testing.T) {
	m := &memDev{data: make([]byte, 1<<20)}
	buf := make([]byte, 64<<10)
	copy(buf, bytes.Repeat([]byte{0xab}, 4096))
	cases := []struct {
		d    ioDesc
		res  int32
		call string
	}{
		{desc(opWrite, 0, 8, 8), 4096, "write 4096 4096 false"},
		{desc(opWrite, ioFlagFUA, 16, 8), 4096, "write 8192 4096 true"},
		{desc(opRead, 0, 8, 16), 8192, "read 4096 8192"},
		{desc(opFlush, 0, 0, 0), 0, "flush"},
		{desc(opDiscard, 0, 64, 128), 0, "trim 32768 65536"},
		{desc(opWriteZeroes, 0, 64, 8), 0, "zero 32768 4096 true"},
		{desc(opWriteZeroes, ioFlagNoUnmap, 64, 8), 0, "zero 32768 4096 false"},
	}
	for _, c := range cases {
		m.calls = nil
		res, err := execute(m, c.d, buf)
		if res != c.res || err != nil || len(m.calls) != 1 || m.calls[0] != c.call {
			t.Errorf("%s: res %d err %v calls %q, want %d %q", opName(c.d.op()), res, err, m.calls, c.res, c.call)
		}
	}
	if !bytes.Equal(buf[:4096], bytes.Repeat([]byte{0xab}, 4096)) {
		t.Fatalf("read did not return the written data")
	}
	// Unsupported op and oversize request: errors, never success.
	if res, err := execute(m, desc(opWriteSame, 0, 0, 8), buf); res != -int32(syscall.EOPNOTSUPP) || err == nil {
		t.Errorf("write_same: %d %v", res, err)
	}
	if res, err := execute(m, desc(opRead, 0, 0, 1024), buf); res != -int32(syscall.EINVAL) || err == nil {
		t.Errorf("oversize read: %d %v", res, err)
	}
}

func TestExecuteErrors(t *testing.T) {
	buf := make([]byte, 4096)
	for _, c := range []struct {
		err  error
		want syscall.Errno
	}{
		{fmt.Errorf("x: %w", blockdev.ErrNoSpace), syscall.ENOSPC},
		{fmt.Errorf("x: %w", blockdev.ErrNotPrimary), syscall.EPERM},
		{fmt.Errorf("x: %w", blockdev.ErrOutOfRange), syscall.EINVAL},
		{errors.New("disk on fire"), syscall.EIO},
	} {
		m := &memDev{data: make([]byte, 1<<20), fail: c.err}
		for _, op := range []uint8{opRead, opWrite, opFlush, opDiscard, opWriteZeroes} {
			res, err := execute(m, desc(op, 0, 0, 8), buf)
			if res != -int32(c.want) || err == nil {
				t.Errorf("%s with %v: res %d, want %d", opName(op), c.err, res, -int32(c.want))
			}
		}
	}
}

type panicDev struct{ memDev }

func (p *panicDev) Flush() error { panic("boom") }

func TestExecutePanicIsEIO(t *testing.T) {
	res, err := execute(&panicDev{}, desc(opFlush, 0, 0, 0), nil)
	if res != -int32(syscall.EIO) || err == nil {
		t.Fatalf("panic: %d %v", res, err)
	}
}

func TestParsePath(t *testing.T) {
	for in, want := range map[string]int{"/dev/ublkb0": 0, "/dev/ublkb12": 12, "/dev/ublkc3": 3, "7": 7} {
		if got, err := ParsePath(in); err != nil || got != want {
			t.Errorf("ParsePath(%q) = %d, %v", in, got, err)
		}
	}
	for _, in := range []string{"/dev/nbd0", "/dev/ublkb", "/dev/ublkb-1", "ublkb1x", "/dev/sda1", ""} {
		if _, err := ParsePath(in); err == nil {
			t.Errorf("ParsePath(%q) accepted", in)
		}
	}
}

func TestOptionsValidation(t *testing.T) {
	for _, o := range []Options{{MaxIO: 1000}, {MaxIO: 64 << 20}, {Depth: 5000}, {Recovery: 9}} {
		if err := o.fill(); !errors.Is(err, blockdev.ErrInvalid) {
			t.Errorf("%+v: %v", o, err)
		}
	}
	o := Options{}
	if err := o.fill(); err != nil || o.Depth != 64 || o.MaxIO != 512<<10 || o.Queues < 1 {
		t.Fatalf("defaults: %+v %v", o, err)
	}
}

// TestServeWithoutDriver checks the error a caller gets on a kernel
// without ublk_drv (this host): a clear ErrNoDriver, not a crash.
func TestServeWithoutDriver(t *testing.T) {
	if _, err := os.Stat(ControlPath); err == nil {
		t.Skip("ublk driver present; the VM tests cover it")
	}
	_, err := Serve(context.Background(), &memDev{data: make([]byte, 1<<20)}, Options{DevID: AutoID})
	if !errors.Is(err, ErrNoDriver) {
		t.Fatalf("Serve without driver: %v, want ErrNoDriver", err)
	}
	t.Logf("error text: %v", err)
}

func TestInlineEligible(t *testing.T) {
	for _, c := range []struct {
		d    ioDesc
		want bool
	}{
		{desc(opRead, 0, 0, 8), true},
		{desc(opWrite, 0, 0, 8), true},
		{desc(opWrite, ioFlagFUA, 0, 8), false},
		{desc(opFlush, 0, 0, 0), false},
		{desc(opDiscard, 0, 0, 8), false},
		{desc(opWriteZeroes, 0, 0, 8), false},
	} {
		if got := inlineEligible(c.d); got != c.want {
			t.Errorf("%s flags %#x: inline %v, want %v", opName(c.d.op()), c.d.flags(), got, c.want)
		}
	}
}
