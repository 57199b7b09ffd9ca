package replication

import (
	"bytes"
	"testing"
	"time"
)

// recMsg is the record frame rawPrimary.record sends, for a batch.
func (rp *rawPrimary) recMsg(lsn uint64, lba int64) *Msg {
	m := &Msg{Type: MsgRecord, LSNFrom: lsn, LSNTo: lsn, Payload: RecordBody{Type: RecWrite, Epoch: rp.ep, Offset: lba * 4096, Length: 4096, Data: pattern(lba, int(lsn))}.Encode(nil)}
	m.Volume, m.Epoch, m.Session = "v1", rp.ep, rp.sess
	return m
}

// sendAll writes the frames in one write, so the receiver finds them
// buffered together and applies them as one batch.
func (rp *rawPrimary) sendAll(msgs ...*Msg) {
	if _, err := rp.c.Write(encodeFrames(rp.t, msgs...)); err != nil {
		rp.t.Fatal(err)
	}
}

// Records that arrive together are applied together, with every rule of
// one-at-a-time apply: duplicates inside the batch are skipped, and a bad
// record (out of range, a gap, another session's frame) is refused after
// the records before it are applied and before anything after it is.
func TestReceiverBatchRefusesFromTheBadRecord(t *testing.T) {
	rn := newNode(t, testVolSize)
	_, log := newCapture()
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 3, "")
	blocks := int64(testVolSize / 4096)
	bad := []struct {
		name string
		msg  func(rp *rawPrimary, lsn uint64) *Msg
		code string
	}{
		{"beyond_end", func(rp *rawPrimary, lsn uint64) *Msg { return rp.recMsg(lsn, blocks) }, CodeProtocol},
		{"gap", func(rp *rawPrimary, lsn uint64) *Msg { return rp.recMsg(lsn+1, 30) }, CodeGap},
		{"other_session", func(rp *rawPrimary, lsn uint64) *Msg {
			m := rp.recMsg(lsn, 30)
			m.Session++
			return m
		}, CodeStaleSession},
	}
	for i, c := range bad {
		rp, m := dialRaw(t, rs.addr, 3, uint64(200+i), "srv-r")
		if m.Type != MsgHelloResp {
			t.Fatalf("%s: hello answered with %s", c.name, m.Type)
		}
		h := rn.vol.HeadLSN()
		lba := int64(10 * i)
		rp.sendAll(rp.recMsg(h+1, lba), rp.recMsg(h+2, lba+1), rp.recMsg(h+2, lba+1), rp.recMsg(h+1, lba),
			rp.recMsg(h+3, lba+2), c.msg(rp, h+4), rp.recMsg(h+4, lba+3), rp.recMsg(h+5, lba+4))
		if code := errCode(t, rp.recv()); code != c.code {
			t.Fatalf("%s: refused with %q, want %q", c.name, code, c.code)
		}
		if got := rn.vol.HeadLSN(); got != h+3 {
			t.Fatalf("%s: head %d, want %d (the records before the bad one, nothing after)", c.name, got, h+3)
		}
		for k := int64(0); k < 5; k++ {
			got := make([]byte, 4096)
			if err := rn.vol.ReadAt(got, (lba+k)*4096); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, 4096)
			if k < 3 {
				want = pattern(lba+k, int(h)+1+int(k))
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s: block %d holds the wrong data (applied: %v)", c.name, lba+k, k < 3)
			}
		}
	}
	// A new session carries on from there, its barrier covering the batch.
	rp, _ := dialRaw(t, rs.addr, 3, 300, "srv-r")
	h := rn.vol.HeadLSN()
	rp.sendAll(rp.recMsg(h+1, 100), rp.recMsg(h+2, 101), &Msg{Type: MsgBarrier, LSNTo: h + 2, Volume: "v1", Epoch: 3, Session: 300})
	m := rp.recv()
	if m.Type != MsgBarrierResp || m.LSNTo != h+2 || rn.vol.DurableLSN() != h+2 {
		t.Fatalf("barrier answer %s lsn %d (durable %d), want %d", m.Type, m.LSNTo, rn.vol.DurableLSN(), h+2)
	}
}

// A frame whose CRC fails inside a batch ends the session as it does
// alone; the records before it are applied, the ones after it are not.
func TestReceiverBatchBadCRC(t *testing.T) {
	rn := newNode(t, testVolSize)
	_, log := newCapture()
	rs := startReplServer(t, "srv-r", log)
	rs.set("v1", rn.vol, 3, "")
	rp, m := dialRaw(t, rs.addr, 3, 400, "srv-r")
	if m.Type != MsgHelloResp {
		t.Fatalf("hello answered with %s", m.Type)
	}
	good := encodeFrames(t, rp.recMsg(1, 1), rp.recMsg(2, 2))
	bad := encodeFrames(t, rp.recMsg(3, 3))
	bad[len(bad)/2] ^= 0xff // a payload byte: the frame CRC fails
	after := encodeFrames(t, rp.recMsg(4, 4))
	if _, err := rp.c.Write(append(append(good, bad...), after...)); err != nil {
		t.Fatal(err)
	}
	rp.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if m, err := rp.mr.Read(); err == nil {
		t.Fatalf("session still served after a bad frame: got %s", m.Type)
	}
	if got := rn.vol.HeadLSN(); got != 2 {
		t.Fatalf("head %d, want 2", got)
	}
}
