package replication

import (
	"bytes"
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/blockvol"
)

func encodeFrames(t testing.TB, msgs ...*Msg) []byte {
	t.Helper()
	var b bytes.Buffer
	for _, m := range msgs {
		if err := WriteFrame(&b, m); err != nil {
			t.Fatal(err)
		}
	}
	return b.Bytes()
}

func TestWireRoundTrip(t *testing.T) {
	msgs := []*Msg{
		{Type: MsgHello, Volume: "v1", Epoch: 3, Session: 9, LSNFrom: 1, LSNTo: 2,
			Payload: Hello{PrimaryID: "s1", TargetServerID: "s2", HeadLSN: 100, OldestLSN: 7, RegionSize: 65536}.Encode()},
		{Type: MsgRecord, Volume: "vol-a", Epoch: 1, Session: 1, LSNFrom: 5, LSNTo: 5,
			Payload: RecordBody{Type: RecWrite, Epoch: 1, Offset: 4096, Length: 4, Data: []byte("abcd")}.Encode(nil)},
		{Type: MsgBarrierResp, Volume: strings.Repeat("x", MaxVolumeName), LSNTo: 1 << 60},
		{Type: MsgPing, Volume: "v"},
	}
	mr := NewMsgReader(bytes.NewReader(encodeFrames(t, msgs...)))
	for i, want := range msgs {
		got, err := mr.Read()
		if err != nil {
			t.Fatalf("msg %d: %v", i, err)
		}
		if got.Type != want.Type || got.Volume != want.Volume || got.Epoch != want.Epoch || got.Session != want.Session ||
			got.LSNFrom != want.LSNFrom || got.LSNTo != want.LSNTo || !bytes.Equal(got.Payload, want.Payload) {
			t.Fatalf("msg %d: got %+v want %+v", i, got, want)
		}
	}
	if _, err := mr.Read(); err == nil || !strings.Contains(err.Error(), "EOF") {
		t.Fatalf("read past the last frame: %v", err)
	}
	h, err := DecodeHello(msgs[0].Payload)
	if err != nil || h.TargetServerID != "s2" || h.HeadLSN != 100 || h.OldestLSN != 7 {
		t.Fatalf("hello: %+v %v", h, err)
	}
	r, err := DecodeRecordBody(msgs[1].Payload)
	if err != nil || r.Offset != 4096 || string(r.Data) != "abcd" {
		t.Fatalf("record: %+v %v", r, err)
	}
	hr := HelloResp{FlushedLSN: 4, HeadLSN: 6, HasPending: true, Pending: Pending{Session: 2, Epoch: 3, Kind: TransferResync, ResetLSN: 50, Progress: 12, Regions: []uint32{7, 9}},
		DivergentKnown: true, Divergent: []uint32{1, 5}}
	hr2, err := DecodeHelloResp(hr.Encode())
	if err != nil || hr2.Pending.ResetLSN != 50 || hr2.Pending.Progress != 12 || len(hr2.Pending.Regions) != 2 || hr2.Pending.Kind != TransferResync || len(hr2.Divergent) != 2 || !hr2.DivergentKnown || hr2.HeadLSN != 6 {
		t.Fatalf("hello resp: %+v %v", hr2, err)
	}
	b := Begin{Kind: TransferResync, ResetLSN: 9, RegionSize: 65536, Regions: []uint32{3, 4}, Resume: true}
	b2, err := DecodeBegin(b.Encode())
	if err != nil || b2.Kind != b.Kind || b2.ResetLSN != 9 || len(b2.Regions) != 2 || !b2.Resume {
		t.Fatalf("begin: %+v %v", b2, err)
	}
	c := BaseChunk{Offset: 8192, Length: 512, Done: 3, Data: make([]byte, 512)}
	c2, err := DecodeBaseChunk(c.Encode(nil))
	if err != nil || c2.Offset != 8192 || c2.Done != 3 || len(c2.Data) != 512 {
		t.Fatalf("chunk: %+v %v", c2, err)
	}
}

func TestWireRejectsCorruption(t *testing.T) {
	m := &Msg{Type: MsgRecord, Volume: "v", Epoch: 1, Session: 1, LSNFrom: 1, LSNTo: 1,
		Payload: RecordBody{Type: RecWrite, Length: 3, Data: []byte("xyz")}.Encode(nil)}
	good := encodeFrames(t, m)
	for i := range good {
		bad := append([]byte(nil), good...)
		bad[i] ^= 0x40
		if _, err := NewMsgReader(bytes.NewReader(bad)).Read(); err == nil {
			t.Fatalf("flipping byte %d was not detected", i)
		}
	}
	for n := 1; n < len(good); n++ {
		if _, err := NewMsgReader(bytes.NewReader(good[:n])).Read(); !errors.Is(err, ErrBadFrame) {
			t.Fatalf("truncated frame of %d bytes: %v", n, err)
		}
	}
	// A header announcing a huge payload is refused before allocating.
	huge := append([]byte(nil), good[:headerSize]...)
	huge[40], huge[41], huge[42], huge[43] = 0xff, 0xff, 0xff, 0xff
	if _, err := NewMsgReader(bytes.NewReader(huge)).Read(); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("huge payload: %v", err)
	}
	if err := WriteFrame(&bytes.Buffer{}, &Msg{Type: MsgPing}); err == nil {
		t.Fatal("empty volume name accepted")
	}
	if _, err := DecodeRecordBody(RecordBody{Type: RecWrite, Length: 10, Data: []byte("abc")}.Encode(nil)); err == nil {
		t.Fatal("record with wrong length accepted")
	}
	if _, err := DecodeRecordBody(RecordBody{Type: RecWrite, Offset: -4096, Length: 3, Data: []byte("abc")}.Encode(nil)); err == nil {
		t.Fatal("record with a negative offset accepted")
	}
	if _, err := DecodeRecordBody(RecordBody{Type: 77}.Encode(nil)); err == nil {
		t.Fatal("unknown record type accepted")
	}
	if _, err := DecodeBegin(Begin{Kind: TransferRebuild, RegionSize: 100}.Encode()); err == nil {
		t.Fatal("bad region size accepted")
	}
}

// edgeOffsets are record and chunk offsets at and around the int64 edges
// (and the volume's), for the fuzzers' seed corpus.
var edgeOffsets = []int64{0, 4096, testVolSize - 4096, testVolSize, math.MaxInt64 - 4095, math.MaxInt64 &^ 4095, math.MaxInt64, -1, -4096, math.MinInt64}

// edgeLengths are record lengths at the uint32 edge, unaligned and zero.
var edgeLengths = []uint32{0, 512, 4096, 8192, math.MaxUint32, math.MaxUint32 &^ 4095, 1 << 31}

// FuzzMsgReader fuzzes the decoder both sides run (MsgReader) on a
// stream of frames, and every payload decoder on what it returns: no
// panic, no huge allocation, and a decoded frame re-encodes to one that
// decodes the same.
func FuzzMsgReader(f *testing.F) {
	seeds := []*Msg{
		{Type: MsgHello, Volume: "v", Payload: Hello{TargetServerID: "a", RegionSize: 512}.Encode()},
		{Type: MsgHelloResp, Volume: "v", Payload: HelloResp{Divergent: []uint32{1}}.Encode()},
		{Type: MsgBegin, Volume: "v", Payload: Begin{Kind: 1, RegionSize: 512, Regions: []uint32{2}}.Encode()},
		{Type: MsgBase, Volume: "v", Payload: BaseChunk{Offset: 0, Length: 512, Zero: true}.Encode(nil)},
		{Type: MsgRecord, Volume: "v", Payload: RecordBody{Type: RecWrite, Length: 1, Data: []byte{1}}.Encode(nil)},
	}
	for _, off := range edgeOffsets {
		for _, n := range edgeLengths {
			seeds = append(seeds,
				&Msg{Type: MsgRecord, Volume: "v", LSNFrom: math.MaxUint64, LSNTo: math.MaxUint64, Payload: RecordBody{Type: RecZero, Offset: off, Length: n}.Encode(nil)},
				&Msg{Type: MsgBase, Volume: "v", Payload: BaseChunk{Offset: off, Length: n, Zero: true}.Encode(nil)})
		}
		seeds = append(seeds, &Msg{Type: MsgRecord, Volume: "v", Payload: RecordBody{Type: RecWrite, Offset: off, Length: 8192, Data: make([]byte, 8192)}.Encode(nil)})
	}
	for _, m := range seeds {
		f.Add(encodeFrames(f, m))
	}
	f.Add(encodeFrames(f, seeds[:5]...))
	f.Fuzz(func(t *testing.T, data []byte) {
		mr := NewMsgReader(bytes.NewReader(data))
		for {
			m, err := mr.Read()
			if err != nil {
				return
			}
			// Every payload decoder must also be safe on whatever it gets.
			_, _ = DecodeHello(m.Payload)
			_, _ = DecodeHelloResp(m.Payload)
			_, _ = DecodeBegin(m.Payload)
			_, _ = DecodeErrorBody(m.Payload)
			if c, err := DecodeBaseChunk(m.Payload); err == nil && (c.Offset < 0 || c.Length == 0) {
				t.Fatalf("base chunk decoded with off=%d len=%d", c.Offset, c.Length)
			}
			if r, err := DecodeRecordBody(m.Payload); err == nil && r.Offset < 0 {
				t.Fatalf("record decoded with a negative offset %d", r.Offset)
			}
			cp := *m
			cp.Payload = append([]byte(nil), m.Payload...)
			re := encodeFrames(t, &cp)
			m2, err := NewMsgReader(bytes.NewReader(re)).Read()
			if err != nil || m2.Type != cp.Type || m2.Volume != cp.Volume || m2.Epoch != cp.Epoch || m2.Session != cp.Session ||
				m2.LSNFrom != cp.LSNFrom || m2.LSNTo != cp.LSNTo || !bytes.Equal(m2.Payload, cp.Payload) {
				t.Fatalf("round trip changed the frame: %v", err)
			}
		}
	})
}

// FuzzReceiverRecord sends one record frame, built from fuzzed fields
// (offsets and lengths at the int64/uint32 edges in the seed corpus),
// through a live Receiver over TCP: the decoder, the validation and the
// apply path the receiver really runs. A record is acknowledged by the
// following barrier only when its extent is inside the volume (checked
// here in arithmetic that cannot wrap), and whatever it is, the volume
// stays healthy: it flushes and checkpoints.
func FuzzReceiverRecord(f *testing.F) {
	for _, off := range edgeOffsets {
		for _, n := range edgeLengths {
			f.Add(RecWrite, off, n, uint32(n))
			f.Add(RecZero, off, n, uint32(0))
		}
	}
	f.Add(RecBarrier, int64(0), uint32(0), uint32(0))
	f.Add(uint8(9), int64(0), uint32(4096), uint32(4096))
	vol, err := blockvol.Create(f.TempDir(), blockvol.Options{Size: testVolSize, WALSize: 8 << 20})
	if err != nil {
		f.Fatal(err)
	}
	defer vol.Close()
	_, log := newCapture()
	recv := NewReceiver(ReceiverConfig{ServerID: "srv-r", Logger: log, Lookup: func(string) (ReplicaTarget, bool) {
		return ReplicaTarget{Vol: vol, Epoch: 3, PrimaryID: testPrimaryID}, true
	}})
	ln := mustListen(f)
	go recv.Serve(ln)
	defer recv.Close()
	var session uint64
	f.Fuzz(func(t *testing.T, typ uint8, off int64, length uint32, nData uint32) {
		session++
		rp, m := dialRaw(t, ln.Addr().String(), 3, session, "srv-r")
		if m.Type != MsgHelloResp {
			t.Fatalf("hello answered with %s", m.Type)
		}
		head := vol.HeadLSN()
		data := make([]byte, min(nData, 1<<20))
		lsn := head + 1
		// Record and barrier in one write: the receiver may close the
		// connection as soon as it refuses the record, and a refusal may
		// then reach this side as a reset instead of a MsgError.
		frames := encodeFrames(t,
			&Msg{Type: MsgRecord, Volume: "v1", Epoch: 3, Session: session, LSNFrom: lsn, LSNTo: lsn,
				Payload: RecordBody{Type: typ, Epoch: 3, Offset: off, Length: length, Data: data}.Encode(nil)},
			&Msg{Type: MsgBarrier, Volume: "v1", Epoch: 3, Session: session, LSNTo: lsn})
		rp.c.Write(frames)
		rp.c.SetReadDeadline(time.Now().Add(30 * time.Second))
		resp, err := rp.mr.Read()
		if err != nil {
			if ne, ok := err.(interface{ Timeout() bool }); ok && ne.Timeout() {
				t.Fatalf("no answer to the record: %v", err)
			}
			resp = &Msg{Type: MsgError} // connection ended: refused
		}
		inside := off >= 0 && length > 0 && off%4096 == 0 && length%4096 == 0 && uint64(off)+uint64(length) <= testVolSize
		valid := typ == RecBarrier && off == 0 && length == 0 && len(data) == 0 ||
			typ == RecWrite && inside && uint32(len(data)) == length ||
			typ == RecZero && inside && len(data) == 0
		switch {
		case resp.Type == MsgBarrierResp && !valid:
			t.Fatalf("record type %d off=%d len=%d data=%d acknowledged", typ, off, length, len(data))
		case resp.Type == MsgBarrierResp && vol.HeadLSN() != lsn:
			t.Fatalf("acknowledged record not applied: head %d", vol.HeadLSN())
		case resp.Type == MsgError && valid:
			t.Fatalf("valid record type %d off=%d len=%d refused: %q", typ, off, length, resp.Payload)
		case resp.Type == MsgError && vol.HeadLSN() != head:
			t.Fatalf("refused record reached the WAL: head %d -> %d", head, vol.HeadLSN())
		case resp.Type != MsgBarrierResp && resp.Type != MsgError:
			t.Fatalf("answered with %s", resp.Type)
		}
		rp.c.Close()
		if err := vol.Flush(); err != nil {
			t.Fatalf("flush after record off=%d len=%d: %v", off, length, err)
		}
		if err := vol.ReplCheckpoint(); err != nil {
			t.Fatalf("checkpoint after record off=%d len=%d: %v", off, length, err)
		}
	})
}
