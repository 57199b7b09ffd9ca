package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/nbd/wire"
)

const testSize = 64 << 20

type testServer struct {
	srv  *Server
	addr string
	dev  *memDev
	errc chan error
}

func startServer(t *testing.T, src ExportSource, opts ...Option) *testServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	opts = append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)
	ts := &testServer{srv: NewServer(src, opts...), addr: l.Addr().String(), errc: make(chan error, 1)}
	go func() { ts.errc <- ts.srv.Serve(l) }()
	t.Cleanup(func() {
		_ = ts.srv.Close()
		if err := <-ts.errc; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return ts
}

func startMem(t *testing.T) *testServer {
	dev := newMemDev(testSize)
	ts := startServer(t, StaticExports{{Name: "vol0", Description: "test volume", Device: dev}})
	ts.dev = dev
	return ts
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7) + byte(i>>9)
	}
	return b
}

func TestNegotiationOptions(t *testing.T) {
	dev := newMemDev(testSize)
	ts := startServer(t, StaticExports{
		{Name: "vol0", Description: "first", Device: dev},
		{Name: "ro", Device: dev, ReadOnly: true},
	})
	rc := dialRaw(t, "tcp", ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)

	// Unknown option: ERR_UNSUP, negotiation goes on.
	rc.sendOpt(99, []byte("junk"))
	if r := rc.readOptReply(); r.typ != wire.RepErrUnsup || r.opt != 99 {
		t.Fatalf("unknown option: %+v", r)
	}
	rc.sendOpt(wire.OptStartTLS, nil)
	if r := rc.readOptReply(); r.typ != wire.RepErrUnsup {
		t.Fatalf("starttls: %+v", r)
	}

	// OPT_LIST: both exports, description carried, then ACK.
	rc.sendOpt(wire.OptList, nil)
	var names []string
	for {
		r := rc.readOptReply()
		if r.typ == wire.RepAck {
			break
		}
		if r.typ != wire.RepServer {
			t.Fatalf("list reply %#x", r.typ)
		}
		nl := binary.BigEndian.Uint32(r.data)
		names = append(names, string(r.data[4:4+nl])+"|"+string(r.data[4+nl:]))
	}
	if strings.Join(names, ",") != "ro|,vol0|first" {
		t.Fatalf("list: %v", names)
	}
	rc.sendOpt(wire.OptList, []byte("x"))
	if r := rc.readOptReply(); r.typ != wire.RepErrInvalid {
		t.Fatalf("list with data: %#x", r.typ)
	}

	// OPT_INFO with NAME, DESCRIPTION, BLOCK_SIZE.
	gi := rc.info(wire.OptInfo, "vol0", wire.InfoName, wire.InfoDescription, wire.InfoBlockSize)
	if gi.errType != 0 || gi.size != testSize || gi.name != "vol0" || gi.desc != "first" {
		t.Fatalf("info: %+v", gi)
	}
	if gi.minB != 512 || gi.prefB != 4096 || gi.maxB != 32<<20 {
		t.Fatalf("block sizes %d/%d/%d", gi.minB, gi.prefB, gi.maxB)
	}
	want := wire.FlagHasFlags | wire.FlagSendFlush | wire.FlagSendFUA | wire.FlagSendTrim | wire.FlagSendWriteZeroes |
		wire.FlagCanMultiConn | wire.FlagSendCache | wire.FlagSendFastZero
	if gi.flags != want {
		t.Fatalf("flags %#x want %#x", gi.flags, want)
	}
	gi = rc.info(wire.OptInfo, "ro")
	if gi.flags&wire.FlagReadOnly == 0 || gi.flags&wire.FlagSendTrim != 0 {
		t.Fatalf("read-only flags %#x", gi.flags)
	}
	// Empty name with two exports: no default.
	if gi := rc.info(wire.OptInfo, ""); gi.errType != wire.RepErrUnknown {
		t.Fatalf("empty name with two exports: %+v", gi)
	}
	// Malformed OPT_GO.
	rc.sendOpt(wire.OptGo, []byte{0, 0, 0, 9, 'x'})
	if r := rc.readOptReply(); r.typ != wire.RepErrInvalid {
		t.Fatalf("malformed go: %#x", r.typ)
	}
	// Meta context before structured replies: invalid.
	rc.sendOpt(wire.OptSetMetaContext, metaData("vol0", wire.MetaBaseAllocation))
	if r := rc.readOptReply(); r.typ != wire.RepErrInvalid {
		t.Fatalf("meta context without structured: %#x", r.typ)
	}
	rc.sendOpt(wire.OptStructuredReply, nil)
	if r := rc.readOptReply(); r.typ != wire.RepAck {
		t.Fatalf("structured: %#x", r.typ)
	}
	// LIST_META_CONTEXT with no query lists base:allocation (id 0).
	rc.sendOpt(wire.OptListMetaContext, metaData("vol0"))
	r := rc.readOptReply()
	if r.typ != wire.RepMetaContext || string(r.data[4:]) != wire.MetaBaseAllocation || binary.BigEndian.Uint32(r.data) != 0 {
		t.Fatalf("list meta: %+v", r)
	}
	if r := rc.readOptReply(); r.typ != wire.RepAck {
		t.Fatalf("list meta ack %#x", r.typ)
	}
	// SET with an unknown context selects nothing.
	rc.sendOpt(wire.OptSetMetaContext, metaData("vol0", "qemu:dirty-bitmap:x"))
	if r := rc.readOptReply(); r.typ != wire.RepAck {
		t.Fatalf("set unknown meta: %#x", r.typ)
	}
	rc.sendOpt(wire.OptSetMetaContext, metaData("vol0", wire.MetaBaseAllocation))
	r = rc.readOptReply()
	if r.typ != wire.RepMetaContext || binary.BigEndian.Uint32(r.data) != wire.MetaBaseAllocationID {
		t.Fatalf("set meta: %+v", r)
	}
	rc.readOptReply()
	rc.structured = true
	gi = rc.info(wire.OptGo, "vol0")
	if gi.errType != 0 || gi.flags&wire.FlagSendDF == 0 {
		t.Fatalf("go: %+v", gi)
	}
	// Transmission works and block status is available.
	rc.request(wire.CmdBlockStatus, 0, 1, 0, 1<<20, nil)
	if rep := rc.readReply(); rep.errno != 0 || len(rep.extents) != 1 || rep.extents[0] != [2]uint32{1 << 20, wire.StateHole | wire.StateZero} {
		t.Fatalf("block status: %+v", rep)
	}
}

func TestExportNameFallback(t *testing.T) {
	ts := startMem(t)
	for _, noZeroes := range []bool{false, true} {
		rc := dialRaw(t, "tcp", ts.addr)
		f := wire.ClientFixedNewstyle
		if noZeroes {
			f |= wire.ClientNoZeroes
		}
		rc.clientFlags(f)
		rc.sendOpt(wire.OptExportName, nil) // empty: the only export
		var b [10]byte
		rc.readFull(b[:])
		if binary.BigEndian.Uint64(b[:]) != testSize {
			t.Fatalf("size %d", binary.BigEndian.Uint64(b[:]))
		}
		if !noZeroes {
			var z [124]byte
			rc.readFull(z[:])
			if z != [124]byte{} {
				t.Fatal("reserved bytes not zero")
			}
		}
		rc.request(wire.CmdWrite, 0, 7, 4096, 4096, pattern(4096, 1))
		if r := rc.readReply(); r.errno != 0 || r.handle != 7 {
			t.Fatalf("write: %+v", r)
		}
		rc.request(wire.CmdRead, 0, 8, 4096, 4096, nil)
		if r := rc.readReply(); r.errno != 0 || !bytes.Equal(r.data, pattern(4096, 1)) {
			t.Fatalf("read back: errno %d", r.errno)
		}
	}
	// Unknown export with EXPORT_NAME: the session ends.
	rc := dialRaw(t, "tcp", ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle)
	rc.sendOpt(wire.OptExportName, []byte("nope"))
	rc.expectClosed()
	// Unknown client flags: closed.
	rc = dialRaw(t, "tcp", ts.addr)
	rc.clientFlags(1 << 7)
	rc.expectClosed()
}

func TestAbort(t *testing.T) {
	ts := startMem(t)
	rc := dialRaw(t, "tcp", ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle)
	rc.sendOpt(wire.OptAbort, nil)
	if r := rc.readOptReply(); r.typ != wire.RepAck {
		t.Fatalf("abort: %#x", r.typ)
	}
	rc.expectClosed()
}

// notPrimary refuses every export with the message a volume server uses.
type notPrimary struct{}

func (notPrimary) Lookup(name string) (Export, error) {
	return Export{}, fmt.Errorf("volume %s: this server is not its primary; primary is server s2 at 10.0.0.2:10809", name)
}
func (notPrimary) Names() []string { return []string{"vol1"} }

func TestLookupErrorReachesClient(t *testing.T) {
	ts := startServer(t, notPrimary{})
	rc := dialRaw(t, "tcp", ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	gi := rc.info(wire.OptGo, "vol1")
	if gi.errType != wire.RepErrUnknown || !strings.Contains(gi.errMsg, "primary is server s2 at 10.0.0.2:10809") {
		t.Fatalf("got %#x %q", gi.errType, gi.errMsg)
	}
	// Negotiation continues after the error.
	rc.sendOpt(wire.OptList, nil)
	if r := rc.readOptReply(); r.typ != wire.RepServer {
		t.Fatalf("list after error: %#x", r.typ)
	}
}

func testIO(t *testing.T, structured bool) {
	ts := startMem(t)
	rc := dialRaw(t, "tcp", ts.addr)
	rc.connect("vol0", structured)
	// Pipeline many writes, then reads, and match replies by handle.
	const n = 64
	for i := 0; i < n; i++ {
		fl := uint16(0)
		if i%8 == 0 {
			fl = wire.CmdFlagFUA
		}
		rc.request(wire.CmdWrite, fl, uint64(i), uint64(i)*8192, 8192, pattern(8192, byte(i)))
	}
	seen := map[uint64]bool{}
	for i := 0; i < n; i++ {
		r := rc.readReply()
		if r.errno != 0 || seen[r.handle] {
			t.Fatalf("write reply %+v", r)
		}
		seen[r.handle] = true
	}
	for i := 0; i < n; i++ {
		rc.request(wire.CmdRead, 0, uint64(1000+i), uint64(i)*8192, 8192, nil)
	}
	for i := 0; i < n; i++ {
		r := rc.readReply()
		idx := int(r.handle) - 1000
		if r.errno != 0 || idx < 0 || idx >= n || !bytes.Equal(r.data, pattern(8192, byte(idx))) {
			t.Fatalf("read reply handle %d errno %d", r.handle, r.errno)
		}
		if structured && (r.chunks != 1 || r.dataOff != uint64(idx)*8192) {
			t.Fatalf("structured read: %d chunks at %d", r.chunks, r.dataOff)
		}
	}
	// A large read (over the copy threshold: goes out by writev).
	big := pattern(4<<20, 9)
	rc.request(wire.CmdWrite, 0, 1, 8<<20, uint32(len(big)), big)
	rc.readReply()
	rc.request(wire.CmdRead, wire.CmdFlagDF&^uint16(boolToFlag(!structured)), 2, 8<<20, uint32(len(big)), nil)
	if r := rc.readReply(); r.errno != 0 || !bytes.Equal(r.data, big) {
		t.Fatalf("big read errno %d len %d", r.errno, len(r.data))
	}
	rc.request(wire.CmdFlush, 0, 3, 0, 0, nil)
	if r := rc.readReply(); r.errno != 0 {
		t.Fatalf("flush %d", r.errno)
	}
	flushes, fuas, _, _, _ := ts.dev.counters()
	if flushes != 1 || fuas != n/8 {
		t.Fatalf("flushes %d fuas %d", flushes, fuas)
	}
	// TRIM, WRITE_ZEROES with and without NO_HOLE, FAST_ZERO, FUA.
	rc.request(wire.CmdTrim, 0, 4, 0, 8192, nil)
	rc.request(wire.CmdWriteZeroes, 0, 5, 8192, 8192, nil)
	rc.request(wire.CmdWriteZeroes, wire.CmdFlagNoHole|wire.CmdFlagFUA, 6, 16384, 8192, nil)
	rc.request(wire.CmdWriteZeroes, wire.CmdFlagFastZero, 7, 24576, 4096, nil)
	rc.request(wire.CmdCache, 0, 8, 0, 1<<20, nil)
	for i := 0; i < 5; i++ {
		if r := rc.readReply(); r.errno != 0 {
			t.Fatalf("handle %d errno %d %s", r.handle, r.errno, r.errMsg)
		}
	}
	_, _, punches, zeroes, trims := ts.dev.counters()
	if punches != 2 || zeroes != 1 || trims != 1 {
		t.Fatalf("punches %d zeroes %d trims %d", punches, zeroes, trims)
	}
	if f, _, _, _, _ := ts.dev.counters(); f != 2 {
		t.Fatalf("FUA on write zeroes did not flush: %d flushes", f)
	}
	rc.request(wire.CmdRead, 0, 9, 0, 32768, nil)
	if r := rc.readReply(); r.errno != 0 || !bytes.Equal(r.data[:28672], make([]byte, 28672)) ||
		!bytes.Equal(r.data[28672:], pattern(8192, 3)[4096:]) {
		t.Fatalf("zeroed range reads back wrong")
	}
	if structured {
		rc.request(wire.CmdBlockStatus, 0, 10, 0, 32768, nil)
		r := rc.readReply()
		// memDev merges only by allocation: trim+punch are holes,
		// NO_HOLE zeroes stay allocated.
		want := [][2]uint32{{16384, 3}, {8192, 0}, {4096, 3}, {4096, 0}}
		if fmt.Sprint(r.extents) != fmt.Sprint(want) {
			t.Fatalf("extents %v want %v", r.extents, want)
		}
		rc.request(wire.CmdBlockStatus, wire.CmdFlagReqOne, 11, 0, 32768, nil)
		if r := rc.readReply(); len(r.extents) != 1 {
			t.Fatalf("REQ_ONE extents %v", r.extents)
		}
	}
}

func boolToFlag(b bool) uint16 {
	if b {
		return 0xffff
	}
	return 0
}

func TestIOSimple(t *testing.T)     { testIO(t, false) }
func TestIOStructured(t *testing.T) { testIO(t, true) }

func testErrors(t *testing.T, structured bool) {
	dev := newMemDev(testSize)
	ts := startServer(t, StaticExports{{Name: "vol0", Device: dev}, {Name: "ro", Device: dev, ReadOnly: true}})
	rc := dialRaw(t, "tcp", ts.addr)
	rc.connect("vol0", structured)
	cases := []struct {
		typ, flags uint16
		off        uint64
		n          uint32
		payload    bool
		want       uint32
	}{
		{wire.CmdRead, 0, testSize, 4096, false, wire.ErrnoInval},          // beyond end
		{wire.CmdRead, 0, testSize - 512, 4096, false, wire.ErrnoInval},    // straddles end
		{wire.CmdWrite, 0, testSize - 512, 4096, true, wire.ErrnoNoSpc},    // write beyond end
		{wire.CmdWrite, 0, 1 << 62, 4096, true, wire.ErrnoNoSpc},           // huge offset
		{wire.CmdRead, 0, 100, 512, false, wire.ErrnoInval},                // misaligned offset
		{wire.CmdWrite, 0, 0, 100, true, wire.ErrnoInval},                  // misaligned length
		{wire.CmdRead, 0, 0, 64 << 20, false, wire.ErrnoOverflow},          // oversized read
		{wire.CmdWrite, 0, 0, 33 << 20, true, wire.ErrnoOverflow},          // oversized write, payload skipped
		{wire.CmdRead, 0, 0, 0, false, wire.ErrnoInval},                    // zero length
		{wire.CmdTrim, 0, testSize, 4096, false, wire.ErrnoNoSpc},          // trim beyond end
		{42, 0, 0, 0, false, wire.ErrnoInval},                              // unknown command
		{wire.CmdFlush, wire.CmdFlagNoHole, 0, 0, false, wire.ErrnoInval},  // bad flag
		{wire.CmdWrite, wire.CmdFlagReqOne, 0, 512, true, wire.ErrnoInval}, // bad flag with payload
		{wire.CmdBlockStatus, 0, testSize, 512, false, wire.ErrnoInval},    // beyond end
	}
	if !structured {
		cases = append(cases, struct {
			typ, flags uint16
			off        uint64
			n          uint32
			payload    bool
			want       uint32
		}{wire.CmdBlockStatus, 0, 0, 512, false, wire.ErrnoInval}) // not negotiated
	}
	for i, c := range cases {
		var p []byte
		if c.payload {
			p = make([]byte, c.n)
		}
		rc.request(c.typ, c.flags, uint64(i), c.off, c.n, p)
		r := rc.readReply()
		if r.handle != uint64(i) || r.errno != c.want {
			t.Fatalf("case %d (cmd %d off %d len %d): handle %d errno %d (%s), want %d", i, c.typ, c.off, c.n, r.handle, r.errno, r.errMsg, c.want)
		}
		if structured && r.errMsg == "" {
			t.Fatalf("case %d: structured error without message", i)
		}
		if r.data != nil {
			t.Fatalf("case %d: error reply carried data", i)
		}
	}
	// A failing read is an error, never data.
	dev.mu.Lock()
	dev.failReadAt = 1 << 20
	dev.mu.Unlock()
	rc.request(wire.CmdRead, 0, 100, 1<<20, 4096, nil)
	if r := rc.readReply(); r.errno != wire.ErrnoIO || r.data != nil {
		t.Fatalf("failed read: %+v", r)
	}
	// The connection still works.
	rc.request(wire.CmdWrite, 0, 101, 0, 4096, pattern(4096, 5))
	if r := rc.readReply(); r.errno != 0 || r.handle != 101 {
		t.Fatalf("write after errors: handle %d errno %d", r.handle, r.errno)
	}
	rc.request(wire.CmdRead, 0, 102, 0, 4096, nil)
	if r := rc.readReply(); r.errno != 0 || !bytes.Equal(r.data, pattern(4096, 5)) {
		t.Fatalf("read after errors: handle %d errno %d", r.handle, r.errno)
	}
	// Read-only export: EPERM for writes, trims, zeroes; reads work.
	ro := dialRaw(t, "tcp", ts.addr)
	ro.connect("ro", structured)
	for i, typ := range []uint16{wire.CmdWrite, wire.CmdTrim, wire.CmdWriteZeroes} {
		var p []byte
		if typ == wire.CmdWrite {
			p = make([]byte, 4096)
		}
		ro.request(typ, 0, uint64(i), 0, 4096, p)
		if r := ro.readReply(); r.errno != wire.ErrnoPerm {
			t.Fatalf("read-only cmd %d: errno %d", typ, r.errno)
		}
	}
	ro.request(wire.CmdRead, 0, 9, 0, 4096, nil)
	if r := ro.readReply(); r.errno != 0 || !bytes.Equal(r.data, pattern(4096, 5)) {
		t.Fatalf("read-only read: errno %d", r.errno)
	}
}

func TestErrorsSimple(t *testing.T)     { testErrors(t, false) }
func TestErrorsStructured(t *testing.T) { testErrors(t, true) }

// TestConcurrentOutOfOrder: a read held inside the device does not stop
// later requests on the same connection; their replies overtake it.
func TestConcurrentOutOfOrder(t *testing.T) {
	ts := startMem(t)
	ts.dev.mu.Lock()
	ts.dev.gateAt = 1 << 20
	ts.dev.gate = make(chan struct{})
	ts.dev.gated = make(chan struct{}, 1)
	ts.dev.mu.Unlock()
	rc := dialRaw(t, "tcp", ts.addr)
	rc.connect("vol0", true)
	rc.request(wire.CmdRead, 0, 1, 1<<20, 4096, nil)
	<-ts.dev.gated
	for i := 2; i <= 10; i++ {
		rc.request(wire.CmdWrite, 0, uint64(i), uint64(i)*4096, 4096, pattern(4096, byte(i)))
	}
	for i := 2; i <= 10; i++ {
		if r := rc.readReply(); r.handle == 1 || r.errno != 0 {
			t.Fatalf("reply %+v before the held read was released", r)
		}
	}
	close(ts.dev.gate)
	if r := rc.readReply(); r.handle != 1 || r.errno != 0 {
		t.Fatalf("held read: %+v", r)
	}
}

// TestDiscDrains: DISC after a held read: the read is answered, then the
// server closes.
func TestDiscDrains(t *testing.T) {
	ts := startMem(t)
	ts.dev.mu.Lock()
	ts.dev.gateAt = 0
	ts.dev.gate = make(chan struct{})
	ts.dev.gated = make(chan struct{}, 1)
	ts.dev.mu.Unlock()
	rc := dialRaw(t, "tcp", ts.addr)
	rc.connect("vol0", false)
	rc.request(wire.CmdRead, 0, 1, 0, 4096, nil)
	<-ts.dev.gated
	rc.request(wire.CmdDisc, 0, 2, 0, 0, nil)
	go func() { time.Sleep(50 * time.Millisecond); close(ts.dev.gate) }()
	if r := rc.readReply(); r.handle != 1 || r.errno != 0 || len(r.data) != 4096 {
		t.Fatalf("read before disc: %+v", r)
	}
	rc.expectClosed()
}

// TestShutdownDrains: Shutdown answers the in-flight request before closing.
func TestShutdownDrains(t *testing.T) {
	dev := newMemDev(testSize)
	dev.gateAt, dev.gate, dev.gated = 0, make(chan struct{}), make(chan struct{}, 1)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(StaticExports{{Name: "vol0", Device: dev}}, WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	rc := dialRaw(t, "tcp", l.Addr().String())
	rc.connect("vol0", true)
	rc.request(wire.CmdRead, 0, 1, 0, 4096, nil)
	<-dev.gated
	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(context.Background()) }()
	// New connections are refused once shutdown started.
	deadline := time.Now().Add(30 * time.Second)
	for {
		nc, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			break
		}
		nc.Close()
		if time.Now().After(deadline) {
			t.Fatal("listener still accepting")
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(dev.gate)
	if r := rc.readReply(); r.handle != 1 || r.errno != 0 || len(r.data) != 4096 {
		t.Fatalf("in-flight read during shutdown: %+v", r)
	}
	rc.expectClosed()
	if err := <-shut; err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, ErrServerClosed) {
		t.Fatal(err)
	}
}

// TestBadMagicClosesOnlyThatConnection.
func TestBadMagicClosesOnlyThatConnection(t *testing.T) {
	ts := startMem(t)
	good := dialRaw(t, "tcp", ts.addr)
	good.connect("vol0", true)
	bad := dialRaw(t, "tcp", ts.addr)
	bad.connect("vol0", true)
	bad.write(bytes.Repeat([]byte{0xde, 0xad}, 14))
	bad.expectClosed()
	good.request(wire.CmdWrite, 0, 1, 0, 4096, pattern(4096, 1))
	if r := good.readReply(); r.errno != 0 {
		t.Fatal(r.errno)
	}
	fresh := dialRaw(t, "tcp", ts.addr)
	fresh.connect("vol0", false)
	fresh.request(wire.CmdRead, 0, 2, 0, 4096, nil)
	if r := fresh.readReply(); r.errno != 0 || !bytes.Equal(r.data, pattern(4096, 1)) {
		t.Fatal("fresh connection read failed")
	}
}

// TestVanishingClientsLeakNothing: clients that drop mid-request (with
// payload half sent, or with replies pending) leave no goroutine behind.
func TestVanishingClientsLeakNothing(t *testing.T) {
	ts := startMem(t)
	// Warm up once so lazily started runtime goroutines are counted.
	w := dialRaw(t, "tcp", ts.addr)
	w.connect("vol0", true)
	w.nc.Close()
	waitConns(t, ts.srv, 0)
	base := runtime.NumGoroutine()
	for i := 0; i < 20; i++ {
		rc := dialRaw(t, "tcp", ts.addr)
		switch i % 4 {
		case 0: // mid-negotiation
			rc.clientFlags(wire.ClientFixedNewstyle)
		case 1: // half a write payload
			rc.connect("vol0", false)
			rc.request(wire.CmdWrite, 0, 1, 0, 1<<20, make([]byte, 1000))
		case 2: // many reads, replies never read
			rc.connect("vol0", true)
			for j := 0; j < 64; j++ {
				rc.request(wire.CmdRead, 0, uint64(j), 0, 1<<20, nil)
			}
		case 3: // half a request header
			rc.connect("vol0", true)
			rc.write([]byte{0x25, 0x60})
		}
		rc.nc.Close()
	}
	waitConns(t, ts.srv, 0)
	deadline := time.Now().Add(30 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines %d > %d\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The device lock is free: a new client works.
	rc := dialRaw(t, "tcp", ts.addr)
	rc.connect("vol0", false)
	rc.request(wire.CmdWrite, 0, 1, 0, 4096, pattern(4096, 2))
	if r := rc.readReply(); r.errno != 0 {
		t.Fatal(r.errno)
	}
}

func waitConns(t *testing.T, s *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for s.Conns() != n {
		if time.Now().After(deadline) {
			t.Fatalf("connections %d, want %d", s.Conns(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestUnixSocketAndDisconnectExport(t *testing.T) {
	dev := newMemDev(testSize)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(StaticExports{{Name: "vol0", Device: dev}}, WithLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))))
	go srv.Serve(l)
	defer srv.Close()
	rc := dialRaw(t, "unix", sock)
	rc.connect("", true) // empty name: the only export
	rc.request(wire.CmdWrite, wire.CmdFlagFUA, 1, 512, 1024, pattern(1024, 3))
	if r := rc.readReply(); r.errno != 0 {
		t.Fatal(r.errno)
	}
	rc.request(wire.CmdRead, 0, 2, 0, 2048, nil)
	if r := rc.readReply(); r.errno != 0 || !bytes.Equal(r.data[512:1536], pattern(1024, 3)) {
		t.Fatal("unix read back")
	}
	if n := srv.DisconnectExport("vol0"); n != 1 {
		t.Fatalf("DisconnectExport closed %d", n)
	}
	rc.expectClosed()
}

// Check that Errno-mapped device errors go out as protocol errnos.
func TestWireErrno(t *testing.T) {
	cases := map[error]uint32{
		blockdev.ErrNotPrimary:                   wire.ErrnoPerm,
		blockdev.ErrReadOnly:                     wire.ErrnoPerm,
		fmt.Errorf("x: %w", blockdev.ErrNoSpace): wire.ErrnoNoSpc,
		blockdev.ErrOutOfRange:                   wire.ErrnoInval,
		blockdev.ErrClosed:                       wire.ErrnoShutdown,
		errors.New("anything"):                   wire.ErrnoIO,
		fmt.Errorf("y: %w", blockdev.ErrIO):      wire.ErrnoIO,
	}
	for err, want := range cases {
		if got := wireErrno(err); got != want {
			t.Errorf("%v: %d want %d", err, got, want)
		}
	}
}

// TestInlineAdaptsToSlowDevice: after fast requests the connection executes
// inline; a request that turns out slow delays the ones behind it only
// until it completes, and lifts the latency estimate so that the next slow
// request is executed while later ones overtake it.
func TestInlineAdaptsToSlowDevice(t *testing.T) {
	ts := startMem(t)
	rc := dialRaw(t, "tcp", ts.addr)
	rc.connect("vol0", true)
	for i := 0; i < 64; i++ { // warm up: the EWMA falls, inline mode
		rc.request(wire.CmdWrite, 0, uint64(i), uint64(i)*4096, 4096, pattern(4096, byte(i)))
		if r := rc.readReply(); r.errno != 0 {
			t.Fatal(r)
		}
	}
	gate := func(off int64) {
		ts.dev.mu.Lock()
		ts.dev.gateAt, ts.dev.gate, ts.dev.gated = off, make(chan struct{}), make(chan struct{}, 1)
		ts.dev.mu.Unlock()
	}
	// Phase 1: a slow read executed inline; later requests wait for it,
	// but all are answered once it completes.
	gate(1 << 20)
	rc.request(wire.CmdRead, 0, 100, 1<<20, 4096, nil)
	<-ts.dev.gated
	for i := 101; i <= 104; i++ {
		rc.request(wire.CmdWrite, 0, uint64(i), uint64(i)*4096, 4096, pattern(4096, 1))
	}
	time.Sleep(20 * time.Millisecond) // the slow request's own latency
	close(ts.dev.gate)
	seen := map[uint64]bool{}
	for i := 0; i < 5; i++ {
		r := rc.readReply()
		if r.errno != 0 {
			t.Fatal(r)
		}
		seen[r.handle] = true
	}
	if len(seen) != 5 {
		t.Fatalf("replies %v", seen)
	}
	// Phase 2: the estimate is high now: the next slow read is handed off
	// and later writes overtake it.
	gate(2 << 20)
	rc.request(wire.CmdRead, 0, 200, 2<<20, 4096, nil)
	<-ts.dev.gated
	for i := 201; i <= 204; i++ {
		rc.request(wire.CmdWrite, 0, uint64(i), uint64(i)*4096, 4096, pattern(4096, 2))
	}
	for i := 201; i <= 204; i++ {
		if r := rc.readReply(); r.handle == 200 || r.errno != 0 {
			t.Fatalf("reply %v before the slow read was released", r)
		}
	}
	close(ts.dev.gate)
	if r := rc.readReply(); r.handle != 200 || r.errno != 0 {
		t.Fatal(r)
	}
}

// TestSyncClientFlushesInline: a client that sends each request after the
// previous reply gets its flushes and FUA writes executed on the reading
// worker (no hand-off); a client that sends requests in a burst gets the
// hand-off back, so a read overtakes a slow flush.
func TestSyncClientFlushesInline(t *testing.T) {
	ts := startMem(t)
	rc := dialRaw(t, "tcp", ts.addr)
	rc.connect("vol0", true)
	h := uint64(0)
	do := func(typ, flags uint16, off uint64, length uint32, payload []byte) {
		t.Helper()
		h++
		rc.request(typ, flags, h, off, length, payload)
		if r := rc.readReply(); r.errno != 0 || r.handle != h {
			t.Fatalf("request %d: %+v", h, r)
		}
	}
	for i := 0; i < 8; i++ { // a synchronous write+flush loop, and FUA writes
		do(wire.CmdWrite, 0, uint64(i)*4096, 4096, pattern(4096, byte(i)))
		do(wire.CmdFlush, 0, 0, 0, nil)
		do(wire.CmdWrite, wire.CmdFlagFUA, uint64(i)*4096, 4096, pattern(4096, byte(i+1)))
	}
	gateFlush := func() chan struct{} {
		g := make(chan struct{})
		ts.dev.mu.Lock()
		ts.dev.flushGate, ts.dev.flushGated = g, make(chan struct{}, 1)
		ts.dev.mu.Unlock()
		return g
	}
	gateRead := func(off int64) {
		ts.dev.mu.Lock()
		ts.dev.gateAt, ts.dev.gate, ts.dev.gated = off, make(chan struct{}), make(chan struct{}, 1)
		ts.dev.mu.Unlock()
	}

	// Inline: the read sent behind a waiting flush is not read (so not
	// executed) until the flush is done.
	fg := gateFlush()
	rc.request(wire.CmdFlush, 0, 100, 0, 0, nil)
	<-ts.dev.flushGated
	gateRead(1 << 20)
	rc.request(wire.CmdRead, 0, 101, 1<<20, 4096, nil)
	select {
	case <-ts.dev.gated:
		t.Fatal("a synchronous client's flush was handed off: the read behind it ran while it waited")
	case <-time.After(100 * time.Millisecond):
	}
	close(fg)
	<-ts.dev.gated // the read runs once the flush is done
	close(ts.dev.gate)
	for _, want := range []uint64{100, 101} {
		if r := rc.readReply(); r.errno != 0 || r.handle != want {
			t.Fatalf("reply %+v, want handle %d", r, want)
		}
	}

	// A burst ends the synchronous run: the flush behind three writes is
	// handed off and a read overtakes it.
	fg = gateFlush()
	var burst []byte
	for i := 0; i < 3; i++ {
		burst = append(burst, rc.frame(wire.CmdWrite, 0, uint64(200+i), uint64(i)*4096, 4096, pattern(4096, 9))...)
	}
	burst = append(burst, rc.frame(wire.CmdFlush, 0, 203, 0, 0, nil)...)
	rc.write(burst)
	<-ts.dev.flushGated
	for i := 0; i < 3; i++ { // in any order: they may have been handed off
		if r := rc.readReply(); r.errno != 0 || r.handle < 200 || r.handle > 202 {
			t.Fatalf("burst write reply %+v", r)
		}
	}
	rc.request(wire.CmdRead, 0, 204, 0, 4096, nil)
	if r := rc.readReply(); r.errno != 0 || r.handle != 204 {
		t.Fatalf("reply %+v: the read did not overtake the waiting flush", r)
	}
	close(fg)
	if r := rc.readReply(); r.errno != 0 || r.handle != 203 {
		t.Fatalf("flush reply %+v", r)
	}

	// Two fsync streams on one connection: each flush arrives alone, but
	// while the other one's inline sync runs. Once a request has come
	// during an inline sync the run ends: the next flush is handed off
	// and a read overtakes it.
	for i := 0; i < 8; i++ {
		do(wire.CmdWrite, 0, uint64(i)*4096, 4096, pattern(4096, byte(i)))
		do(wire.CmdFlush, 0, 0, 0, nil)
	}
	fg = gateFlush()
	rc.request(wire.CmdFlush, 0, 300, 0, 0, nil) // inline: the run is long
	<-ts.dev.flushGated
	rc.request(wire.CmdFlush, 0, 301, 0, 0, nil) // the other stream's, waiting unread
	time.Sleep(20 * time.Millisecond)            // in the socket before the sync ends
	fg2 := make(chan struct{})
	ts.dev.mu.Lock()
	ts.dev.flushGate, ts.dev.flushGated = fg2, make(chan struct{}, 1)
	ts.dev.mu.Unlock()
	close(fg)
	if r := rc.readReply(); r.errno != 0 || r.handle != 300 {
		t.Fatalf("reply %+v, want the first flush", r)
	}
	<-ts.dev.flushGated // flush 301 waits
	rc.request(wire.CmdRead, 0, 302, 0, 4096, nil)
	_ = rc.nc.SetReadDeadline(time.Now().Add(5 * time.Second)) // inline, the read would wait for ever
	r, err := rc.tryReadReply()
	if err != nil || r.errno != 0 || r.handle != 302 {
		t.Fatalf("reply %+v, %v: the read waited behind the second stream's flush (still inline)", r, err)
	}
	_ = rc.nc.SetReadDeadline(time.Now().Add(60 * time.Second))
	close(fg2)
	if r := rc.readReply(); r.errno != 0 || r.handle != 301 {
		t.Fatalf("flush reply %+v", r)
	}
}
