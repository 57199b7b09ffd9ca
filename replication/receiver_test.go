package replication

import (
	"net"
	"testing"
	"time"
)

// rawPrimary speaks the wire protocol by hand to a receiver.
type rawPrimary struct {
	t    *testing.T
	c    net.Conn
	mr   *MsgReader
	sess uint64
	ep   uint64
}

func dialRaw(t *testing.T, addr string, epoch, session uint64, target string) (*rawPrimary, *Msg) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rp := &rawPrimary{t: t, c: c, mr: NewMsgReader(c), sess: session, ep: epoch}
	rp.send(&Msg{Type: MsgHello, Payload: Hello{PrimaryID: testPrimaryID, TargetServerID: target, HeadLSN: 10, OldestLSN: 1, RegionSize: 65536}.Encode()})
	return rp, rp.recv()
}

func (rp *rawPrimary) send(m *Msg) {
	m.Volume, m.Epoch, m.Session = "v1", rp.ep, rp.sess
	if _, err := rp.c.Write(encodeFrames(rp.t, m)); err != nil {
		rp.t.Fatal(err)
	}
}

func (rp *rawPrimary) recv() *Msg {
	rp.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	m, err := rp.mr.Read()
	if err != nil {
		rp.t.Fatalf("read: %v", err)
	}
	cp := *m
	cp.Payload = append([]byte(nil), m.Payload...)
	return &cp
}

func (rp *rawPrimary) record(lsn uint64, lba int64) {
	rp.send(&Msg{Type: MsgRecord, LSNFrom: lsn, LSNTo: lsn, Payload: RecordBody{Type: RecWrite, Epoch: rp.ep, Offset: lba * 4096, Length: 4096, Data: pattern(lba, int(lsn))}.Encode(nil)})
}

func errCode(t *testing.T, m *Msg) string {
	t.Helper()
	if m.Type != MsgError {
		t.Fatalf("expected an error, got %s", m.Type)
	}
	eb, err := DecodeErrorBody(m.Payload)
	if err != nil {
		t.Fatal(err)
	}
	return eb.Code
}

// Duplicates are skipped, a gap is refused, a barrier is answered with the
// FlushedLSN after fdatasync; wrong server, unknown volume and a stale
// epoch are refused at the handshake.
func TestReceiverContiguityAndRefusals(t *testing.T) {
	logs, log := newCapture()
	rn := newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 3, "")

	rp, m := dialRaw(t, rs.addr, 3, 77, "srv-r")
	if m.Type != MsgHelloResp {
		t.Fatalf("hello answered with %s", m.Type)
	}
	hr, _ := DecodeHelloResp(m.Payload)
	if !hr.Blank || hr.FlushedLSN != 0 {
		t.Fatalf("hello resp %+v", hr)
	}
	rp.record(1, 5)
	rp.record(2, 6)
	rp.record(2, 6) // duplicate: skipped
	rp.record(1, 5) // duplicate: skipped
	rp.send(&Msg{Type: MsgBarrier, LSNTo: 2})
	m = rp.recv()
	if m.Type != MsgBarrierResp || m.LSNTo != 2 || rn.vol.DurableLSN() != 2 {
		t.Fatalf("barrier answer %s lsn %d (durable %d)", m.Type, m.LSNTo, rn.vol.DurableLSN())
	}
	rp.record(4, 7) // gap: refused
	if code := errCode(t, rp.recv()); code != CodeGap {
		t.Fatalf("gap refused with %q", code)
	}
	if rn.vol.HeadLSN() != 2 {
		t.Fatalf("replica head %d after dup+gap, want 2", rn.vol.HeadLSN())
	}
	logs.waitEvent(t, EvRefused, map[string]string{"code": CodeGap, "lsn": "4", "head": "2"})

	for _, c := range []struct {
		epoch  uint64
		target string
		vol    string
		code   string
	}{{3, "srv-x", "v1", CodeWrongServer}, {2, "srv-r", "v1", CodeStaleEpoch}, {4, "srv-r", "v1", CodeStaleEpoch}} {
		_, m := dialRaw(t, rs.addr, c.epoch, 99, c.target)
		if code := errCode(t, m); code != c.code {
			t.Errorf("hello epoch %d target %s: %q, want %q", c.epoch, c.target, code, c.code)
		}
	}
	// A newer session supersedes the old one; the old one's messages are refused.
	old, _ := dialRaw(t, rs.addr, 3, 100, "srv-r")
	nw, m := dialRaw(t, rs.addr, 3, 101, "srv-r")
	if m.Type != MsgHelloResp {
		t.Fatalf("new session: %s", m.Type)
	}
	old.record(3, 9)
	old.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := old.mr.Read(); err == nil {
		t.Fatal("old session still served")
	}
	nw.record(3, 9)
	nw.send(&Msg{Type: MsgBarrier, LSNTo: 3})
	if m := nw.recv(); m.Type != MsgBarrierResp || m.LSNTo != 3 {
		t.Fatalf("new session barrier: %s %d", m.Type, m.LSNTo)
	}
}

// Issue 18: a record frame with offset 2^63-4096 and length 8192 passed
// the receiver's off+len check (the sum wraps negative) and a barrier
// acknowledged it; the flusher then failed on it forever. It must be
// refused before it reaches the WAL, and the volume must stay healthy:
// the next session applies, flushes, checkpoints and recovers.
func TestReceiverRefusesOverflowingRecord(t *testing.T) {
	logs, log := newCapture()
	rn := newNode(t, testVolSize)
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 3, "")

	rp, m := dialRaw(t, rs.addr, 3, 7, "srv-r")
	if m.Type != MsgHelloResp {
		t.Fatalf("hello answered with %s", m.Type)
	}
	rp.record(1, 5)
	const off = int64(1<<63 - 4096)
	rp.send(&Msg{Type: MsgRecord, LSNFrom: 2, LSNTo: 2, Payload: RecordBody{Type: RecWrite, Epoch: 3, Offset: off, Length: 8192, Data: make([]byte, 8192)}.Encode(nil)})
	rp.send(&Msg{Type: MsgBarrier, LSNTo: 2})
	if m := rp.recv(); m.Type != MsgError || errCode(t, m) != CodeProtocol {
		t.Fatalf("overflowing record answered with %s (want a protocol refusal)", m.Type)
	}
	logs.waitEvent(t, EvRefused, map[string]string{"code": CodeProtocol, "lsn": "2", "length": "8192"})
	if h := rn.vol.HeadLSN(); h != 1 {
		t.Fatalf("replica head %d after the refused record, want 1", h)
	}
	nw, m := dialRaw(t, rs.addr, 3, 8, "srv-r")
	if m.Type != MsgHelloResp {
		t.Fatalf("second session: %s", m.Type)
	}
	nw.record(2, 6)
	nw.send(&Msg{Type: MsgBarrier, LSNTo: 2})
	if m := nw.recv(); m.Type != MsgBarrierResp || m.LSNTo != 2 {
		t.Fatalf("barrier after the refused record: %s %d", m.Type, m.LSNTo)
	}
	if err := rn.vol.ReplCheckpoint(); err != nil {
		t.Fatalf("checkpoint: %v", err)
	}
	rs.stop()
	rn.reopen()
	if rn.vol.HeadLSN() != 2 || rn.vol.CheckpointLSN() != 2 {
		t.Fatalf("after reopen: head %d checkpoint %d, want 2/2", rn.vol.HeadLSN(), rn.vol.CheckpointLSN())
	}
	got := make([]byte, 4096)
	if err := rn.vol.ReadAt(got, 6*4096); err != nil || string(got) != string(pattern(6, 2)) {
		t.Fatalf("block 6 after reopen: %v", err)
	}
}

// A stranger re-sending Hellos is logged once per refusalLogEvery per
// (volume, peer, code), with the count of the refusals in between.
func TestRefusalLogRateLimited(t *testing.T) {
	var l refusalLog
	t0 := time.Unix(1_000_000, 0)
	if _, ok := l.note("v\x00evil", t0); !ok {
		t.Fatal("first refusal not logged")
	}
	for i := 1; i <= 49; i++ {
		if _, ok := l.note("v\x00evil", t0.Add(time.Duration(i)*200*time.Millisecond)); ok {
			t.Fatalf("refusal %d within the window logged", i)
		}
	}
	if _, ok := l.note("v\x00other", t0.Add(time.Second)); !ok {
		t.Fatal("another peer's first refusal not logged")
	}
	if n, ok := l.note("v\x00evil", t0.Add(refusalLogEvery)); !ok || n != 49 {
		t.Fatalf("after the window: logged %v with %d suppressed, want true/49", ok, n)
	}
}
