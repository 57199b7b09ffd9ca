package replication

// Snapshots for a rebuilt replica. A rebuild gives the replica the
// primary's data but not the WAL history its snapshots were created in, so
// once the base has been sent (and before MsgDone) the primary sends every
// snapshot whose record the replica has already been streamed, newest
// first: a MsgSnapBegin (its info, and the ranges where it may differ from
// the next newer one; none for the newest, which is compared whole with
// the live volume), then MsgSnapData chunks that cover those ranges in
// order, Total bytes in all. The replica installs each with
// blockvol.InstallSnapshot, which stores only what differs. A snapshot
// whose record comes later is created by that record after the transfer;
// one whose record arrived during the transfer was kept as absent
// (receiver.go) and is installed here. A replica that cannot install one
// (it still holds snapshots of its own from before the rebuild, for
// example) skips it, logs snapshot_install_skipped and reads the data on:
// missing snapshots are the documented outcome, wrong ones never are.

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/blockd/blockd/blockvol"
)

// Events of the snapshot transfer.
const (
	EvSnapshotSent      = "snapshot_sent"            // primary: replica, snapshot, lsn, bytes
	EvSnapshotInstalled = "snapshot_installed"       // replica: snapshot, id, lsn, bytes
	EvSnapshotInstSkip  = "snapshot_install_skipped" // replica: snapshot, id, reason
)

// SnapBegin is the payload of MsgSnapBegin (JSON: sent once per snapshot).
type SnapBegin struct {
	Info blockvol.SnapshotInfo `json:"info"`
	// Ranges where the snapshot may differ from the next newer one sent
	// before it; nil for the newest (the whole snapshot is sent).
	Ranges []blockvol.Range `json:"ranges"`
	// NewerUUID names the snapshot Ranges are relative to ("" for the
	// newest): the replica installs only when that is its oldest.
	NewerUUID string `json:"newer_uuid"`
	// Total is the number of bytes the MsgSnapData chunks that follow
	// cover (the sum of Ranges, or the snapshot's size).
	Total int64 `json:"total"`
}

// sendSnapshots sends the snapshots of a rebuild (see the top of the file).
// A snapshot deleted meanwhile is left out, and the chain continues from
// the last one sent.
func (s *session) sendSnapshots(buf, zero []byte) error {
	p := s.r.p
	list := p.vol.Snapshots() // oldest first
	sent := s.next - 1
	var newer blockvol.SnapshotInfo
	for i := len(list) - 1; i >= 0; i-- {
		si := list[i]
		if si.LSN > sent {
			continue // its record is still to come: the replica creates it
		}
		rd, err := p.vol.OpenSnapshot(si.Name)
		if errors.Is(err, blockvol.ErrSnapshotNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("snapshot transfer: open %s: %w", si.Name, err)
		}
		err = s.sendSnapshot(rd, si, newer, buf, zero)
		rd.Close()
		if err != nil {
			return err
		}
		newer = si
	}
	return nil
}

func (s *session) sendSnapshot(rd *blockvol.SnapshotReader, si, newer blockvol.SnapshotInfo, buf, zero []byte) error {
	p := s.r.p
	var ranges []blockvol.Range
	if newer.Name != "" {
		var err error
		if ranges, err = p.vol.ChangedRanges(si.Name, newer.Name); err != nil {
			if errors.Is(err, blockvol.ErrSnapshotNotFound) {
				return nil // deleted meanwhile: older ones are skipped by the replica's chain check
			}
			return fmt.Errorf("snapshot transfer: %s against %s: %w", si.Name, newer.Name, err)
		}
		if ranges == nil {
			ranges = []blockvol.Range{}
		}
	}
	cover := ranges
	if newer.Name == "" {
		cover = []blockvol.Range{{Off: 0, Len: si.SizeBytes}}
	}
	var total int64
	for _, r := range cover {
		total += r.Len
	}
	b, err := json.Marshal(SnapBegin{Info: si, Ranges: ranges, NewerUUID: newer.UUID, Total: total})
	if err != nil {
		return err
	}
	if err := s.write(&Msg{Type: MsgSnapBegin, Payload: b}); err != nil {
		return err
	}
	var bytes int64
	for _, r := range cover {
		for off := r.Off; off < r.Off+r.Len; {
			n := min(int64(len(buf)), r.Off+r.Len-off)
			data := buf[:n]
			if err := rd.ReadAt(data, off); err != nil {
				return fmt.Errorf("snapshot transfer: read %s at %d: %w", si.Name, off, err)
			}
			c := BaseChunk{Offset: off, Length: uint32(n)}
			if string(data) == string(zero[:n]) {
				c.Zero = true
			} else {
				c.Data = data
				bytes += n
			}
			if err := s.write(&Msg{Type: MsgSnapData, Payload: c.Encode(make([]byte, 0, 32+len(c.Data)))}); err != nil {
				return err
			}
			off += n
		}
	}
	s.r.baseBytes.Add(bytes)
	s.log.Info(EvSnapshotSent, "snapshot", si.Name, "id", si.ID, "lsn", si.LSN, "bytes", bytes, "covered", total)
	return nil
}

// snapStream reads a snapshot's MsgSnapData chunks off the connection as
// InstallSnapshot asks for its bytes (sequentially, over the same ranges).
type snapStream struct {
	rc    *rconn
	left  int64 // bytes of chunks not yet read off the connection
	cur   BaseChunk
	pos   int64 // consumed of cur
	have  bool
	connE error // a connection or protocol error: the session ends
	read  int64 // bytes consumed since the last keep-alive
}

func (st *snapStream) next() error {
	if st.left <= 0 {
		return errors.New("snapshot data ended early")
	}
	m, err := st.rc.mr.Read()
	if err != nil {
		return err
	}
	if m.Type != MsgSnapData || m.Session != st.rc.fence.Session || m.Epoch != st.rc.fence.Epoch {
		return fmt.Errorf("%w: %s (session %d) inside a snapshot's data", ErrBadFrame, m.Type, m.Session)
	}
	c, err := DecodeBaseChunk(m.Payload)
	if err != nil {
		return err
	}
	if int64(c.Length) > st.left {
		return fmt.Errorf("%w: snapshot chunk of %d bytes, %d left", ErrBadFrame, c.Length, st.left)
	}
	st.left -= int64(c.Length)
	st.cur, st.pos, st.have = c, 0, true
	// The replica says nothing else while it installs: keep the session
	// alive (the primary ends one silent for DeadAfter).
	if st.read += int64(c.Length); st.read >= 64<<20 {
		st.read = 0
		if x := st.rc.xfer; x != nil {
			if err := st.rc.send(&Msg{Type: MsgProgress, LSNTo: uint64(x.st.Progress)}); err != nil {
				return err
			}
		}
	}
	return nil
}

// readAt is InstallSnapshot's source.
func (st *snapStream) readAt(p []byte, off int64) error {
	for len(p) > 0 {
		if !st.have || st.pos == int64(st.cur.Length) {
			if err := st.next(); err != nil {
				st.connE = err
				return err
			}
		}
		if at := st.cur.Offset + st.pos; at != off {
			st.connE = fmt.Errorf("%w: snapshot data at %d, wanted %d", ErrBadFrame, at, off)
			return st.connE
		}
		n := min(int64(len(p)), int64(st.cur.Length)-st.pos)
		if st.cur.Zero {
			clear(p[:n])
		} else {
			copy(p[:n], st.cur.Data[st.pos:st.pos+n])
		}
		st.pos += n
		off += n
		p = p[n:]
	}
	return nil
}

// drain reads the chunks InstallSnapshot did not ask for.
func (st *snapStream) drain() error {
	for st.left > 0 {
		if err := st.next(); err != nil {
			return err
		}
	}
	return nil
}

// installSnapshot handles a MsgSnapBegin (and reads its data).
func (rc *rconn) installSnapshot(m *Msg) error {
	var b SnapBegin
	if err := json.Unmarshal(m.Payload, &b); err != nil {
		return fmt.Errorf("%w: snapshot begin: %v", ErrBadFrame, err)
	}
	if rc.xfer == nil || rc.xfer.st.Kind != TransferRebuild {
		return fmt.Errorf("%w: snapshot %q outside a rebuild", ErrBadFrame, b.Info.Name)
	}
	if b.Total < 0 || b.Total > 1<<50 {
		return fmt.Errorf("%w: snapshot %q with %d bytes", ErrBadFrame, b.Info.Name, b.Total)
	}
	vol := rc.tgt.Vol
	st := &snapStream{rc: rc, left: b.Total}
	skip := func(reason string) error {
		rc.log.Warn(EvSnapshotInstSkip, "snapshot", b.Info.Name, "id", b.Info.ID, "lsn", b.Info.LSN, "reason", reason)
		return st.drain()
	}
	if have, err := vol.SnapshotInfo(b.Info.Name); err == nil {
		if have.UUID == b.Info.UUID && have.ID == b.Info.ID {
			return st.drain() // installed by an earlier, interrupted session
		}
		return skip("a different snapshot of that name is here")
	}
	// Ranges are relative to the snapshot sent before this one: it must be
	// the oldest here (or, for the newest, there must be none).
	here := vol.Snapshots()
	switch {
	case b.NewerUUID == "" && len(here) > 0:
		return skip(fmt.Sprintf("this replica holds %d snapshot(s) from before the rebuild", len(here)))
	case b.NewerUUID != "" && (len(here) == 0 || here[0].UUID != b.NewerUUID):
		return skip("the snapshot it is relative to was not installed here")
	}
	err := vol.InstallSnapshot(b.Info, b.Ranges, st.readAt)
	if st.connE != nil {
		return fmt.Errorf("replication: snapshot %q: %w", b.Info.Name, st.connE)
	}
	if err != nil {
		return skip(err.Error())
	}
	if err := st.drain(); err != nil {
		return err
	}
	rc.log.Info(EvSnapshotInstalled, "snapshot", b.Info.Name, "id", b.Info.ID, "lsn", b.Info.LSN, "bytes", b.Total)
	return nil
}
