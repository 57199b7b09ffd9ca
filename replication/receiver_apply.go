package replication

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"time"

	"github.com/blockd/blockd/wal"
)

// The replica's apply path: the session loop that reads the primary's
// messages, the record apply and the barrier worker that answers with
// the durable LSN.

func (rc *rconn) loop() error {
	for {
		rc.c.SetReadDeadline(time.Time{})
		m, err := rc.mr.Read()
		if err != nil {
			return err
		}
		if f := rc.admit(m); f != nil {
			return rc.refuseWith(f)
		}
		switch m.Type {
		case MsgRecord:
			if err := rc.applyRecords(m); err != nil {
				return err
			}
		case MsgBarrier:
			rc.rv.commit(m.LSNFrom)
			rc.bmu.Lock()
			if m.LSNTo > rc.bwant || !rc.bactive {
				rc.bwant = max(rc.bwant, m.LSNTo)
				rc.bactive = true
			}
			rc.bcond.Signal()
			rc.bmu.Unlock()
		case MsgPing:
			if err := rc.send(&Msg{Type: MsgPong}); err != nil {
				return err
			}
		case MsgBegin:
			b, err := DecodeBegin(m.Payload)
			if err != nil {
				rc.refuse(CodeProtocol, err.Error())
				return err
			}
			if err := rc.begin(b); err != nil {
				rc.refuse(CodeApply, err.Error())
				return err
			}
		case MsgBase:
			c, err := DecodeBaseChunk(m.Payload)
			if err != nil {
				rc.refuse(CodeProtocol, err.Error())
				return err
			}
			if err := rc.base(c); err != nil {
				rc.refuse(CodeApply, err.Error())
				return err
			}
		case MsgSnapBegin:
			if err := rc.installSnapshot(m); err != nil {
				rc.refuse(CodeApply, err.Error())
				return err
			}
		case MsgDone:
			if err := rc.done(m.LSNTo); err != nil {
				rc.refuse(CodeApply, err.Error())
				return err
			}
		default:
			rc.refuse(CodeProtocol, "unexpected "+m.Type.String())
			return ErrBadFrame
		}
	}
}

// refusal is a refusal not sent yet: a batch applies the records before
// the refused one first, as one-at-a-time apply would have.
type refusal struct {
	code, msg string
	attrs     []any
	err       error
}

func (rc *rconn) refuseWith(f *refusal) error {
	rc.refuse(f.code, f.msg, f.attrs...)
	return f.err
}

// admit checks a message against the session: its volume, fence, and the
// server's current epoch and primary for the volume.
func (rc *rconn) admit(m *Msg) *refusal {
	if m.Volume != rc.volume {
		return &refusal{code: CodeProtocol, msg: "volume changed within a session", err: ErrBadFrame}
	}
	if err := rc.fence.Check(m.Epoch, m.Session); err != nil {
		return &refusal{code: CodeStaleSession, msg: err.Error(), err: err}
	}
	// The server may have moved this volume to a newer epoch since the
	// session began: the old primary is refused before anything is applied.
	tgt, ok := rc.r.cfg.Lookup(rc.volume)
	if !ok || tgt.Epoch != m.Epoch {
		return &refusal{code: CodeStaleEpoch, msg: fmt.Sprintf("message epoch %d, replica epoch %d", m.Epoch, tgt.Epoch),
			attrs: []any{"replica_epoch", tgt.Epoch, "type", m.Type.String()}, err: ErrStaleEpoch}
	}
	if tgt.PrimaryID != rc.tgt.PrimaryID {
		return &refusal{code: CodeWrongPrimary, msg: fmt.Sprintf("session of %q, the assignment now names %q", rc.tgt.PrimaryID, tgt.PrimaryID),
			attrs: []any{"type", m.Type.String()}, err: ErrWrongPrimary}
	}
	return nil
}

// batchRecs bounds the records of one batch (a var: 1 is one-at-a-time
// apply, for benchmarks).
var batchRecs = 256

// rbatch is the batch being collected (reused across batches).
type rbatch struct {
	recs []wal.Record
}

// applyRecords applies the record m and every record frame after it that
// is already complete in the connection's read buffer, as one batch: one
// ApplyRecords call (one WAL write for the batch) instead of one per
// record; the barrier that follows syncs them all at once. The frames
// after m are parsed where they lie in the read buffer (no copy: their
// payloads go from there into the WAL write) and consumed once the batch
// is applied. Each record is checked as it is parsed (frame CRC,
// session, epoch, LSN sequence, validity); the first that fails is
// refused after the records before it are applied, and nothing after it
// is. A record is never held back waiting for more data: the batch ends
// with what the connection has.
func (rc *rconn) applyRecords(m *Msg) error {
	b := &rc.batch
	br := rc.mr.r
	var buffered []byte
	if n := br.Buffered(); n > 0 {
		buffered, _ = br.Peek(n) // no read: n bytes are buffered
	}
	used := 0
	finish := func() error {
		err := rc.applyBatch()
		br.Discard(used)
		return err
	}
	next := rc.tgt.Vol.HeadLSN() + 1
	for {
		rec, skip, f := rc.record(m, next)
		if f != nil {
			if err := finish(); err != nil {
				return err
			}
			return rc.refuseWith(f)
		}
		if !skip {
			b.recs = append(b.recs, rec)
			next++
		}
		if len(b.recs) >= batchRecs {
			return finish()
		}
		nm, n, err := parseRecordFrame(buffered[used:])
		used += n
		if err != nil {
			if aerr := finish(); aerr != nil {
				return aerr
			}
			return err
		}
		if nm == nil {
			return finish()
		}
		m = nm
		if f := rc.admit(m); f != nil {
			if err := finish(); err != nil {
				return err
			}
			return rc.refuseWith(f)
		}
	}
}

// parseRecordFrame parses the record frame at the start of buf in place
// (its payload aliases buf), checking it as MsgReader.Read does. It
// returns a nil message when buf does not start with a complete record
// frame (another type, or not all of it buffered yet), and on a bad frame
// an error and the frame's length (it is consumed, as Read would).
func parseRecordFrame(buf []byte) (*Msg, int, error) {
	if len(buf) < headerSize || MsgType(buf[4]) != MsgRecord {
		return nil, 0, nil
	}
	m, volLen, payLen, err := parseHeader(buf[:headerSize])
	if err != nil {
		return nil, headerSize, err
	}
	n := headerSize + volLen + payLen + trailerSize
	if len(buf) < n {
		return nil, 0, nil
	}
	body := buf[headerSize : n-trailerSize]
	if got, want := binary.BigEndian.Uint32(buf[n-trailerSize:]), crc32.Checksum(buf[:n-trailerSize], castagnoli); got != want {
		return nil, n, fmt.Errorf("%w: got %08x want %08x", ErrBadCRC, got, want)
	}
	m.Volume = string(body[:volLen])
	m.Payload = body[volLen : volLen+payLen : volLen+payLen]
	return m, n, nil
}

// record decodes and checks the record m, next being the LSN the batch
// expects: a duplicate (catch-up overlap) is skipped; a gap, a bad
// record or a failure to note the lineage is a refusal.
func (rc *rconn) record(m *Msg, next uint64) (wal.Record, bool, *refusal) {
	body, err := DecodeRecordBody(m.Payload)
	if err != nil {
		return wal.Record{}, false, &refusal{code: CodeProtocol, msg: err.Error(), err: err}
	}
	lsn := m.LSNFrom
	if lsn < next {
		return wal.Record{}, true, nil // duplicate (catch-up overlap): skipped
	}
	if lsn != next {
		return wal.Record{}, false, &refusal{code: CodeGap, msg: fmt.Sprintf("record LSN %d after head %d", lsn, next-1),
			attrs: []any{"lsn", lsn, "head", next - 1}, err: fmt.Errorf("replication: LSN gap: got %d, head %d", lsn, next-1)}
	}
	rec := wal.Record{LSN: lsn, Epoch: body.Epoch, Type: wal.RecordType(body.Type), Offset: body.Offset, Length: body.Length, Payload: body.Data}
	// Validated (overflow-safe, against this volume's size and block
	// size) before anything is stored: a bad record never reaches the
	// WAL, the lineage file or the transfer's live set.
	if err := rc.tgt.Vol.ValidateRecord(rec); err != nil {
		return rec, false, &refusal{code: CodeProtocol, msg: err.Error(), attrs: []any{"lsn", lsn, "offset", body.Offset, "length", body.Length},
			err: fmt.Errorf("%w: %v", ErrBadFrame, err)}
	}
	if err := rc.noteLineage(lsn); err != nil {
		return rec, false, &refusal{code: CodeApply, msg: err.Error(), err: err}
	}
	if x := rc.xfer; x != nil && body.Type == RecSnapshot {
		// A base transfer is under way: blocks not yet transferred still
		// hold this replica's old data, so a snapshot taken now would
		// preserve the wrong bytes. The snapshot is recorded as absent
		// here (the record kept, as a delete of a snapshot this volume
		// does not have, for the LSN sequence); later records about it
		// find it absent too.
		rec.Type = wal.SnapshotDelete
		rc.log.Warn(EvSnapshotSkipped, "lsn", lsn, "reason", "base_transfer_in_progress", "transfer", x.st.Kind.String(),
			"reset_lsn", x.st.ResetLSN)
	}
	return rec, false, nil
}

// applyBatch applies the collected records and empties the batch. The
// records the volume applied are noted (tail retention, the transfer's
// live set) even when a later one of the batch fails.
func (rc *rconn) applyBatch() error {
	b := &rc.batch
	if len(b.recs) == 0 {
		return nil
	}
	n, err := rc.tgt.Vol.ApplyRecords(b.recs)
	rc.rv.appliedRun(b.recs[:n])
	if x := rc.xfer; x != nil {
		for _, rec := range b.recs[:n] {
			if t := uint8(rec.Type); rec.LSN > x.st.ResetLSN && t != RecBarrier && !isSnapshotRec(t) {
				x.live.mark(rec.Offset, int64(rec.Length))
			}
		}
	}
	var lsn uint64
	if err != nil {
		lsn = b.recs[min(n, len(b.recs)-1)].LSN
	}
	clear(b.recs) // no payload (read buffer) kept alive
	b.recs = b.recs[:0]
	if err != nil {
		rc.refuse(CodeApply, err.Error(), "lsn", lsn)
		return fmt.Errorf("replication: apply LSN %d: %w", lsn, err)
	}
	return nil
}

func (rc *rconn) barrierWorker() {
	rc.bmu.Lock()
	defer rc.bmu.Unlock()
	for {
		for !rc.bactive && !rc.bdone {
			rc.bcond.Wait()
		}
		if rc.bdone {
			return
		}
		want := rc.bwant
		rc.bactive = false
		rc.bmu.Unlock()
		err := rc.tgt.Vol.Flush()
		flushed := rc.tgt.Vol.DurableLSN()
		if err != nil {
			rc.log.Error("barrier_failed", "lsn", want, "err", err.Error())
			rc.refuse(CodeApply, "fdatasync: "+err.Error())
			rc.c.Close()
		} else {
			rc.log.Debug(EvBarrier, "lsn", want, "flushed", flushed)
			rc.send(&Msg{Type: MsgBarrierResp, LSNFrom: want, LSNTo: flushed})
		}
		rc.bmu.Lock()
	}
}

func (rc *rconn) stopBarrier() {
	rc.bmu.Lock()
	rc.bdone = true
	rc.bcond.Broadcast()
	rc.bmu.Unlock()
}

// appliedRun notes applied records under one lock (see applied).
func (v *rvol) appliedRun(recs []wal.Record) {
	if len(recs) == 0 {
		return
	}
	v.tmu.Lock()
	defer v.tmu.Unlock()
	for _, rec := range recs {
		if rec.LSN <= v.committed {
			continue
		}
		size := int64(len(rec.Payload)) + 64
		v.tail = append(v.tail, tailEnt{rec.LSN, size})
		v.tailBytes += size
	}
	for len(v.tail) > 0 && v.tailBytes > v.tailCap {
		v.tailBytes -= v.tail[0].size
		v.tail = v.tail[1:]
	}
	v.syncHoldLocked()
}
