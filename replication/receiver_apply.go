package replication

import (
	"fmt"
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
		if m.Volume != rc.volume {
			rc.refuse(CodeProtocol, "volume changed within a session")
			return ErrBadFrame
		}
		if err := rc.fence.Check(m.Epoch, m.Session); err != nil {
			rc.refuse(CodeStaleSession, err.Error())
			return err
		}
		// The server may have moved this volume to a newer epoch since the
		// session began: the old primary is refused before anything is applied.
		tgt, ok := rc.r.cfg.Lookup(rc.volume)
		if !ok || tgt.Epoch != m.Epoch {
			rc.refuse(CodeStaleEpoch, fmt.Sprintf("message epoch %d, replica epoch %d", m.Epoch, tgt.Epoch), "replica_epoch", tgt.Epoch, "type", m.Type.String())
			return ErrStaleEpoch
		}
		if tgt.PrimaryID != rc.tgt.PrimaryID {
			rc.refuse(CodeWrongPrimary, fmt.Sprintf("session of %q, the assignment now names %q", rc.tgt.PrimaryID, tgt.PrimaryID), "type", m.Type.String())
			return ErrWrongPrimary
		}
		switch m.Type {
		case MsgRecord:
			if err := rc.applyRecord(m); err != nil {
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

func (rc *rconn) applyRecord(m *Msg) error {
	body, err := DecodeRecordBody(m.Payload)
	if err != nil {
		rc.refuse(CodeProtocol, err.Error())
		return err
	}
	vol := rc.tgt.Vol
	lsn := m.LSNFrom
	head := vol.HeadLSN()
	if lsn <= head {
		return nil // duplicate (catch-up overlap): skipped
	}
	if lsn != head+1 {
		rc.refuse(CodeGap, fmt.Sprintf("record LSN %d after head %d", lsn, head), "lsn", lsn, "head", head)
		return fmt.Errorf("replication: LSN gap: got %d, head %d", lsn, head)
	}
	rec := wal.Record{LSN: lsn, Epoch: body.Epoch, Type: wal.RecordType(body.Type), Offset: body.Offset, Length: body.Length, Payload: body.Data}
	// Validated (overflow-safe, against this volume's size and block
	// size) before anything is stored: a bad record never reaches the
	// WAL, the lineage file or the transfer's live set.
	if err := vol.ValidateRecord(rec); err != nil {
		rc.refuse(CodeProtocol, err.Error(), "lsn", lsn, "offset", body.Offset, "length", body.Length)
		return fmt.Errorf("%w: %v", ErrBadFrame, err)
	}
	if err := rc.noteLineage(lsn); err != nil {
		rc.refuse(CodeApply, err.Error())
		return err
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
	if err := vol.ApplyRecord(rec); err != nil {
		rc.refuse(CodeApply, err.Error(), "lsn", lsn)
		return fmt.Errorf("replication: apply LSN %d: %w", lsn, err)
	}
	rc.rv.applied(lsn, int64(len(body.Data))+64)
	if x := rc.xfer; x != nil && lsn > x.st.ResetLSN && body.Type != RecBarrier && !isSnapshotRec(body.Type) {
		x.live.mark(body.Offset, int64(body.Length))
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
