package replication

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"testing"

	"github.com/blockd/blockd/blockvol"
)

func TestPlanSnapshotSyncTable(t *testing.T) {
	info := func(id uint64) blockvol.SnapshotInfo {
		return blockvol.SnapshotInfo{ID: id, LSN: id * 10, Name: fmt.Sprintf("s%d", id), UUID: fmt.Sprintf("00000000-0000-4000-8000-%012d", id)}
	}
	ref := func(id uint64) SnapRef {
		in := info(id)
		return SnapRef{ID: in.ID, LSN: in.LSN, UUID: in.UUID, Name: in.Name}
	}
	infos := func(ids ...uint64) []blockvol.SnapshotInfo {
		var out []blockvol.SnapshotInfo
		for _, id := range ids {
			out = append(out, info(id))
		}
		return out
	}
	refs := func(ids ...uint64) []SnapRef {
		var out []SnapRef
		for _, id := range ids {
			out = append(out, ref(id))
		}
		return out
	}
	other := ref(2)
	other.UUID = "00000000-0000-4000-8000-999999999999" // same ID, name, LSN: another snapshot
	moved := ref(2)
	moved.LSN = 21
	ids := func(l []blockvol.SnapshotInfo) []uint64 {
		var out []uint64
		for _, in := range l {
			out = append(out, in.ID)
		}
		return out
	}
	rids := func(l []SnapRef) []uint64 {
		var out []uint64
		for _, r := range l {
			out = append(out, r.ID)
		}
		return out
	}
	cases := []struct {
		name             string
		primary          []blockvol.SnapshotInfo
		replica          []SnapRef
		keep, drop, send []uint64
		reason           string
	}{
		{"both empty", nil, nil, nil, nil, nil, SnapSyncSame},
		{"the same", infos(1, 2, 3), refs(1, 2, 3), []uint64{1, 2, 3}, nil, nil, SnapSyncSame},
		{"replica empty", infos(1, 2), nil, nil, nil, []uint64{1, 2}, SnapSyncReplicaNone},
		{"primary empty", nil, refs(1, 2), nil, []uint64{1, 2}, nil, SnapSyncPrimaryNone},
		// Resync gaps.
		{"deleted during the gap", infos(2, 3), refs(1, 2, 3), []uint64{2, 3}, []uint64{1}, nil, SnapSyncNewestKept},
		{"middle deleted during the gap", infos(1, 3), refs(1, 2, 3), []uint64{1, 3}, []uint64{2}, nil, SnapSyncNewestKept},
		{"created during the gap", infos(1, 2, 3), refs(1, 2), nil, []uint64{1, 2}, []uint64{1, 2, 3}, SnapSyncNoneKept},
		{"created and deleted during the gap", infos(2, 3, 4), refs(1, 2), nil, []uint64{1, 2}, []uint64{2, 3, 4}, SnapSyncNoneKept},
		// A rebuild interrupted after it installed the newest ones.
		{"newest installed", infos(1, 2, 3), refs(3), []uint64{3}, nil, []uint64{1, 2}, SnapSyncNewestKept},
		{"newest installed, one older stale", infos(1, 2, 3), refs(1, 3), []uint64{3}, []uint64{1}, []uint64{1, 2}, SnapSyncNewestKept},
		// The replica's own (never the primary's).
		{"own newer", infos(1, 2), refs(1, 2, 9), []uint64{1, 2}, []uint64{9}, nil, SnapSyncNewestKept},
		{"same ID, another UUID", infos(1, 2), []SnapRef{ref(1), other}, nil, []uint64{1, 2}, []uint64{1, 2}, SnapSyncNoneKept},
		{"same UUID, another LSN", infos(1, 2), []SnapRef{ref(1), moved}, nil, []uint64{1, 2}, []uint64{1, 2}, SnapSyncNoneKept},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			pl := PlanSnapshotSync(c.primary, c.replica)
			if !slices.Equal(ids(pl.Keep), c.keep) || !slices.Equal(rids(pl.Drop), c.drop) || !slices.Equal(ids(pl.Send), c.send) || pl.Reason != c.reason {
				t.Fatalf("keep %v drop %v send %v (%s), want keep %v drop %v send %v (%s)",
					ids(pl.Keep), rids(pl.Drop), ids(pl.Send), pl.Reason, c.keep, c.drop, c.send, c.reason)
			}
			// Invariants: keep+send is the primary's list; every one sent
			// is older than every one kept; keep+drop is the replica's.
			if got := append(slices.Clone(pl.Send), pl.Keep...); !slices.Equal(ids(got), ids(c.primary)) {
				t.Fatalf("send+keep %v, primary %v", ids(got), ids(c.primary))
			}
			if len(pl.Keep) > 0 && len(pl.Send) > 0 && pl.Send[len(pl.Send)-1].LSN >= pl.Keep[0].LSN {
				t.Fatalf("sends %v not all older than kept %v", ids(pl.Send), ids(pl.Keep))
			}
			if len(pl.Keep)+len(pl.Drop) != len(c.replica) {
				t.Fatalf("keep %d + drop %d != replica %d", len(pl.Keep), len(pl.Drop), len(c.replica))
			}
		})
	}
}

// The snapshot list in the HelloResp is asked for by the Hello and trails
// the payload: an answer without it (an older replica) decodes as not
// known, one with it round-trips, and a list that claims more entries
// than the payload holds is refused.
func TestHelloRespSnapshotsCompat(t *testing.T) {
	base := HelloResp{FlushedLSN: 7, HeadLSN: 9, Divergent: []uint32{1, 4}, ForkLSN: 8, DivergentKnown: true}
	old, err := DecodeHelloResp(base.Encode())
	if err != nil || old.SnapshotsKnown || old.Snapshots != nil || old.ForkLSN != 8 || len(old.Divergent) != 2 {
		t.Fatalf("answer without a list: %+v, %v", old, err)
	}
	empty := base
	empty.SnapshotsKnown = true
	got, err := DecodeHelloResp(empty.Encode())
	if err != nil || !got.SnapshotsKnown || len(got.Snapshots) != 0 {
		t.Fatalf("empty list: %+v, %v", got, err)
	}
	with := base
	with.SnapshotsKnown = true
	with.Snapshots = []SnapRef{{ID: 1, LSN: 3, UUID: "00000000-0000-4000-8000-000000000001", Name: "a"}, {ID: 5, LSN: 9, UUID: "u", Name: "b"}}
	got, err = DecodeHelloResp(with.Encode())
	if err != nil || !got.SnapshotsKnown || !slices.Equal(got.Snapshots, with.Snapshots) || got.ForkLSN != 8 {
		t.Fatalf("list round trip: %+v, %v", got, err)
	}
	b := with.Encode()
	if _, err := DecodeHelloResp(b[:len(b)-1]); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("truncated list: %v", err)
	}
	huge := append(base.Encode(), 0xff, 0xff, 0xff, 0xff)
	if _, err := DecodeHelloResp(huge); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("list count beyond the payload: %v", err)
	}
}

// The receiver lists its snapshots only when the Hello asks for them
// (an older primary's Hello does not, and gets the answer it knows), and
// refuses a snapshot plan outside a transfer.
func TestReceiverListsSnapshotsWhenAsked(t *testing.T) {
	_, log := newCapture()
	rs := startReplServer(t, "srv-b", log)
	vol, dir := newVol(t)
	in, err := vol.CreateSnapshot("s1", blockvol.SnapshotOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rs.set("v1", vol, 1, dir)
	_, m := dialRaw(t, rs.addr, 1, 11, "srv-b")
	hr, err := DecodeHelloResp(m.Payload)
	if m.Type != MsgHelloResp || err != nil || hr.SnapshotsKnown {
		t.Fatalf("answer to a Hello without features: %s %+v %v", m.Type, hr, err)
	}

	c, err := net.Dial("tcp", rs.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	rp := &rawPrimary{t: t, c: c, mr: NewMsgReader(c), sess: 13, ep: 1}
	rp.send(&Msg{Type: MsgHello, LSNFrom: HelloFeatSnapshots, Payload: Hello{PrimaryID: testPrimaryID, TargetServerID: "srv-b", HeadLSN: 10, OldestLSN: 1, RegionSize: 65536}.Encode()})
	m = rp.recv()
	hr, err = DecodeHelloResp(m.Payload)
	want := []SnapRef{{ID: in.ID, LSN: in.LSN, UUID: in.UUID, Name: "s1"}}
	if m.Type != MsgHelloResp || err != nil || !hr.SnapshotsKnown || !slices.Equal(hr.Snapshots, want) {
		t.Fatalf("answer to a Hello asking for snapshots: %s %+v %v", m.Type, hr, err)
	}
	rp.send(&Msg{Type: MsgSnapBegin, Payload: []byte(`{"plan":{"keep":[]}}`)})
	if code := errCode(t, rp.recv()); code != CodeApply {
		t.Fatalf("plan outside a transfer: %s", code)
	}
	if len(vol.Snapshots()) != 1 {
		t.Fatalf("a refused plan dropped snapshots: %+v", vol.Snapshots())
	}
}
