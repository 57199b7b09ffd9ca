package replication

// Snapshots after a base transfer. A rebuild gives the replica the
// primary's data but not the WAL history its snapshots were created in; a
// resync (or the truncation of a divergent tail) copies only some regions
// and ships none of the snapshot records of the replica's gap. So once
// the base has been sent (and before MsgDone) the replica is brought to
// hold exactly the primary's snapshots whose records it has been
// streamed (the ones with a later record are created by it after the
// transfer):
//
//   - Plan. The replica listed its snapshots in its HelloResp (a Hello
//     with HelloFeatSnapshots asks for it). PlanSnapshotSync
//     (snapshot_sync.go) decides which of them it keeps (its copies of
//     the primary's newest), which it drops, and which of the primary's
//     are sent (all older than the kept ones); the primary logs
//     snapshot_sync_planned and sends the plan as a MsgSnapBegin carrying
//     only Plan: the snapshots to keep. The replica drops every other one
//     with blockvol.ReplDropSnapshots (no WAL record; snapshots_dropped).
//     A replica that listed none (an older one) gets no plan, and
//     snapshots only after a rebuild, as before.
//   - Transfer. The primary sends each snapshot to install, newest first:
//     a MsgSnapBegin (its info, and the ranges where it may differ from
//     the next newer one; none for the newest with nothing kept, which is
//     compared whole with the live volume), then MsgSnapData chunks that
//     cover those ranges in order, Total bytes in all. The snapshot the
//     ranges are relative to is kept open on the primary until the next
//     is sent, so it cannot be deleted under the chain. The replica
//     installs each with blockvol.InstallSnapshot, which stores only what
//     differs.
//
// A snapshot record that reaches the replica while its base transfer
// runs would capture an unfinished base: the replica records it as
// absent (receiver.go) and, its LSN being covered, it is planned and
// installed here with the others. A replica that cannot install one
// (an older primary that sent no plan, and snapshots of its own from
// before the rebuild, for example) skips it, logs
// snapshot_install_skipped and reads the data on: missing snapshots are
// the outcome then, wrong ones never are.

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

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
	// Plan, when set, makes this message the transfer's plan instead of
	// a snapshot (Info empty, no data follows): the replica keeps only the
	// snapshots Plan.Keep names and drops its others.
	Plan *SnapPlan `json:"plan,omitempty"`
}

// SnapPlan is what a replica is told of a SnapshotSyncPlan.
type SnapPlan struct {
	Keep []SnapRef `json:"keep"`
}

// sendSnapshots plans and sends the snapshots after a base transfer
// (see the top of the file). A snapshot deleted meanwhile is left out,
// and the chain continues from the last one sent.
func (s *session) sendSnapshots(buf, zero []byte) error {
	p := s.r.p
	sent := s.next - 1
	var list []blockvol.SnapshotInfo // oldest first, records already streamed
	for _, si := range p.vol.Snapshots() {
		if si.LSN <= sent {
			list = append(list, si)
		}
	}
	toSend := list
	var newer blockvol.SnapshotInfo
	var newerRd *blockvol.SnapshotReader // keeps newer from being deleted
	defer func() {
		if newerRd != nil {
			newerRd.Close()
		}
	}()
	if s.replicaSnapsKnown {
		plan := PlanSnapshotSync(list, s.replicaSnaps)
		if len(plan.Keep) > 0 {
			rd, err := p.vol.OpenSnapshot(plan.Keep[0].Name)
			switch {
			case errors.Is(err, blockvol.ErrSnapshotNotFound):
				// Deleted since the list was taken: keep none, send what is left.
				plan = SnapshotSyncPlan{Drop: s.replicaSnaps, Send: list, Reason: SnapSyncKeptDeleted}
			case err != nil:
				return fmt.Errorf("snapshot transfer: open %s: %w", plan.Keep[0].Name, err)
			default:
				newer, newerRd = plan.Keep[0], rd
			}
		}
		s.log.Info(EvSnapshotSyncPlanned, "kind", s.kind.String(), "keep", len(plan.Keep), "drop", len(plan.Drop), "send", len(plan.Send),
			"reason", plan.Reason, "primary_snapshots", len(list), "replica_snapshots", len(s.replicaSnaps))
		b, err := json.Marshal(SnapBegin{Plan: &SnapPlan{Keep: snapRefs(plan.Keep)}})
		if err != nil {
			return err
		}
		if err := s.write(&Msg{Type: MsgSnapBegin, Payload: b}); err != nil {
			return err
		}
		toSend = plan.Send
	}
	for i := len(toSend) - 1; i >= 0; i-- {
		si := toSend[i]
		rd, err := p.vol.OpenSnapshot(si.Name)
		if errors.Is(err, blockvol.ErrSnapshotNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("snapshot transfer: open %s: %w", si.Name, err)
		}
		if err := s.sendSnapshot(rd, si, newer, buf, zero); err != nil {
			rd.Close()
			return err
		}
		if newerRd != nil {
			newerRd.Close()
		}
		newer, newerRd = si, rd
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
	if rc.xfer == nil {
		return fmt.Errorf("%w: snapshot %q outside a transfer", ErrBadFrame, b.Info.Name)
	}
	if b.Plan != nil {
		if b.Total != 0 || b.Info.Name != "" {
			return fmt.Errorf("%w: snapshot plan with a snapshot (%q, %d bytes)", ErrBadFrame, b.Info.Name, b.Total)
		}
		return rc.applySnapPlan(b.Plan)
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

// applySnapPlan drops every snapshot the plan does not keep (without a
// WAL record: the primary's log has none for them).
func (rc *rconn) applySnapPlan(pl *SnapPlan) error {
	vol := rc.tgt.Vol
	keep := func(in blockvol.SnapshotInfo) bool {
		for _, k := range pl.Keep {
			if sameSnap(in, k) {
				return true
			}
		}
		return false
	}
	dropped, err := vol.ReplDropSnapshots(keep)
	if err != nil {
		return fmt.Errorf("replication: snapshot plan: %w", err)
	}
	// A kept snapshot missing here (nothing should remove one in between)
	// makes the installs relative to it skip, never install wrong bytes.
	here := vol.Snapshots()
	missing := 0
	for _, k := range pl.Keep {
		if !slices.ContainsFunc(here, func(in blockvol.SnapshotInfo) bool { return sameSnap(in, k) }) {
			missing++
		}
	}
	names := make([]string, 0, len(dropped))
	for _, in := range dropped {
		names = append(names, in.Name)
	}
	rc.log.Info(EvSnapshotsDropped, "dropped", len(dropped), "kept", len(pl.Keep), "missing", missing,
		"transfer", rc.xfer.st.Kind.String(), "names", strings.Join(names, ","))
	return nil
}
