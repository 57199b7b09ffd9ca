package replication

import (
	"bytes"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/vfs"
)

// stranger speaks the protocol to a replica's listener as a server that
// read the volume's epoch and the servers' IDs from the master's API.
type stranger struct {
	c  net.Conn
	mr *MsgReader
	id string
	ep uint64
	ss uint64
}

func dialStranger(t *testing.T, addr, id, target string, epoch, session uint64, head uint64) (*stranger, *Msg, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	t.Cleanup(func() { c.Close() })
	s := &stranger{c: c, mr: NewMsgReader(c), id: id, ep: epoch, ss: session}
	s.send(&Msg{Type: MsgHello, Payload: Hello{PrimaryID: id, TargetServerID: target, HeadLSN: head, OldestLSN: 1, RegionSize: 65536}.Encode()})
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	m, err := s.mr.Read()
	return s, m, err
}

// send writes a frame and ignores errors: the replica may have closed
// the connection already, which is what the tests want.
func (s *stranger) send(m *Msg) {
	m.Volume, m.Epoch, m.Session = "v1", s.ep, s.ss
	var b bytes.Buffer
	WriteFrame(&b, m)
	s.c.Write(b.Bytes())
}

func block4k(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }

// hostPair is a primary host A and a replica host B of volume v1 at
// epoch 1 over TCP, in sync.
type hostPair struct {
	clk          *clock
	a, b         *node
	ha, hb       *Host
	addrA, addrB string
	pa           *Primary
	dev          blockdev.Device
	lease        time.Time
}

func startPair(t *testing.T, log *slog.Logger, mode Durability) *hostPair {
	hp := &hostPair{clk: &clock{t: time.Unix(1_000_000, 0)}}
	hp.a, hp.b = newNode(t, testVolSize), newNode(t, testVolSize)
	hp.ha, hp.addrA = startHost(t, "srv-a", hp.clk, log)
	hp.hb, hp.addrB = startHost(t, "srv-b", hp.clk, log)
	hp.ha.AddVolume("v1", hp.a.vol)
	hp.hb.AddVolume("v1", hp.b.vol)
	hp.lease = hp.clk.t.Add(time.Hour)
	if err := hp.hb.Apply(Assignment{Volume: "v1", Role: RoleReplica, Epoch: 1, PrimaryID: "srv-a"}); err != nil {
		t.Fatal(err)
	}
	if err := hp.ha.Apply(Assignment{Volume: "v1", Role: RolePrimary, Epoch: 1, PrimaryID: "srv-a", LeaseUntil: hp.lease,
		Durability: mode, Replicas: []Peer{{"srv-b", hp.addrB}}, ActingSet: []string{"srv-b"}}); err != nil {
		t.Fatal(err)
	}
	hp.pa, _ = hp.ha.Primary("v1")
	waitState(t, hp.pa, "srv-b", InSync)
	hp.dev, _ = hp.ha.Device("v1")
	return hp
}

// Issue 18 item 3: a stranger who knows the epoch and the IDs sends a
// Hello, a record and a barrier to the replica. The replica refuses the
// Hello (wrong_primary, logged), applies nothing, keeps the real
// primary's session, and after the primary dies the promoted replica
// serves the real primary's flushed 0xab, not the stranger's bytes.
func TestHostRefusesStrangerSession(t *testing.T) {
	logs, log := newCapture()
	hp := startPair(t, log, SyncAll)
	for i := int64(0); i < 16; i++ {
		if err := hp.dev.WriteAt(block4k(0xab), i*4096, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := hp.dev.Flush(); err != nil {
		t.Fatal(err)
	}
	live, _ := replicaState(hp.pa, "srv-b")
	head := hp.b.vol.HeadLSN()

	s, m, err := dialStranger(t, hp.addrB, "evil", "srv-b", 1, live.Session+1, head)
	if err != nil {
		t.Fatalf("stranger's hello: %v", err)
	}
	if m.Type != MsgError || errCode(t, m) != CodeWrongPrimary {
		t.Fatalf("stranger's hello answered with %s (want %s)", m.Type, CodeWrongPrimary)
	}
	for i := uint64(1); i <= 16; i++ {
		s.send(&Msg{Type: MsgRecord, LSNFrom: head + i, LSNTo: head + i,
			Payload: RecordBody{Type: RecWrite, Epoch: 1, Offset: int64(i-1) * 4096, Length: 4096, Data: block4k(0xcd)}.Encode(nil)})
	}
	s.send(&Msg{Type: MsgBarrier, LSNTo: head + 16})
	s.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if m, err := s.mr.Read(); err == nil && m.Type == MsgBarrierResp {
		t.Fatal("the stranger's barrier was acknowledged")
	}
	logs.waitEvent(t, EvHelloRefused, map[string]string{"code": CodeWrongPrimary, "primary": "evil", "named_primary": "srv-a", "volume": "v1"})
	if h := hp.b.vol.HeadLSN(); h != head {
		t.Fatalf("replica head moved from %d to %d: the stranger's records were applied", head, h)
	}
	// The live session is untouched and still acknowledges flushes.
	if err := hp.dev.WriteAt(block4k(0xab), 16*4096, false); err != nil {
		t.Fatal(err)
	}
	if err := hp.dev.Flush(); err != nil {
		t.Fatalf("flush after the stranger: %v", err)
	}
	if st, _ := replicaState(hp.pa, "srv-b"); st.Session != live.Session || st.State != InSync {
		t.Fatalf("live session %d/%v became %d/%v", live.Session, live.State, st.Session, st.State)
	}
	// The primary dies before it reconnects; the replica is promoted.
	hp.ha.Close()
	if err := hp.hb.Apply(Assignment{Volume: "v1", Role: RolePrimary, Epoch: 2, PrimaryID: "srv-b", LeaseUntil: hp.lease,
		Durability: BestEffort, Replicas: []Peer{{"srv-a", hp.addrA}}}); err != nil {
		t.Fatal(err)
	}
	devB, ok := hp.hb.Device("v1")
	if !ok {
		t.Fatal("promoted replica exports no device")
	}
	got := make([]byte, 4096)
	for i := int64(0); i < 17; i++ {
		if err := devB.ReadAt(got, i*4096); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, block4k(0xab)) {
			t.Fatalf("block %d on the promoted replica is not the flushed 0xab (first byte %#x)", i, got[0])
		}
	}
}

// Issue 18 item 4: Hellos re-sent in a loop by a stranger do not disturb
// the live session: every flush of a sync_all volume succeeds and the
// session is never replaced.
func TestHostStrangerHelloLoopKeepsSession(t *testing.T) {
	_, log := newCapture()
	hp := startPair(t, log, SyncAll)
	live, _ := replicaState(hp.pa, "srv-b")
	var hellos, wrong atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := uint64(1); ; n++ {
			select {
			case <-stop:
				return
			default:
			}
			s, m, err := dialStranger(t, hp.addrB, "evil", "srv-b", 1, live.Session+n, hp.b.vol.HeadLSN())
			if err == nil {
				hellos.Add(1)
				if m.Type != MsgError {
					wrong.Add(1)
				}
				s.c.Close()
			}
		}
	}()
	runs, failed := 0, 0
	for ; runs < 2000 && (runs < 40 || hellos.Load() < 40); runs++ {
		if err := hp.dev.WriteAt(block4k(byte(runs)), int64(runs%64)*4096, false); err != nil {
			t.Fatal(err)
		}
		if err := hp.dev.Flush(); err != nil {
			failed++
			t.Errorf("flush %d with a stranger re-sending hellos: %v", runs, err)
		}
	}
	close(stop)
	wg.Wait()
	t.Logf("%d write+flush runs, %d failed, %d stranger hellos", runs, failed, hellos.Load())
	if hellos.Load() == 0 {
		t.Fatal("the stranger never got an answer")
	}
	if wrong.Load() != 0 {
		t.Fatalf("%d stranger hellos were accepted", wrong.Load())
	}
	if st, _ := replicaState(hp.pa, "srv-b"); st.Session != live.Session || st.State != InSync {
		t.Fatalf("live session %d/%v became %d/%v", live.Session, live.State, st.Session, st.State)
	}
}

// A Hello at a higher epoch is accepted only from the named primary (an
// acting-set change re-Hellos at epoch+1): the replica persists the epoch
// before it answers. The same from a stranger is refused and the epoch
// stays.
func TestHostHigherEpochOnlyFromNamedPrimary(t *testing.T) {
	logs, log := newCapture()
	hp := startPair(t, log, SyncAll)
	_, m, err := dialStranger(t, hp.addrB, "evil", "srv-b", 5, 1, 0)
	if err != nil || m.Type != MsgError || errCode(t, m) != CodeWrongPrimary {
		t.Fatalf("stranger at a higher epoch: %v %v", m, err)
	}
	if e := hp.b.vol.Epoch(); e != 1 {
		t.Fatalf("replica epoch %d after a stranger's higher epoch", e)
	}
	if err := hp.ha.Apply(Assignment{Volume: "v1", Role: RolePrimary, Epoch: 2, PrimaryID: "srv-a", LeaseUntil: hp.lease,
		Durability: SyncAll, Replicas: []Peer{{"srv-b", hp.addrB}}, ActingSet: []string{"srv-b"}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "replica at epoch 2", func() bool { return hp.b.vol.Epoch() == 2 })
	waitState(t, hp.pa, "srv-b", InSync)
	logs.waitEvent(t, EvEpochAdvanced, map[string]string{"volume": "v1", "epoch": "2", "old_epoch": "1", "primary": "srv-a"})
	if st := hp.hb.Status(); st[0].Epoch != 2 || st[0].Role != RoleReplica {
		t.Fatalf("replica status %+v", st[0])
	}
	if err := hp.dev.WriteAt(block4k(1), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := hp.dev.Flush(); err != nil {
		t.Fatalf("flush at epoch 2: %v", err)
	}
	// The master's own assignment at epoch 2 then changes nothing.
	if err := hp.hb.Apply(Assignment{Volume: "v1", Role: RoleReplica, Epoch: 2, PrimaryID: "srv-a"}); err != nil {
		t.Fatal(err)
	}
}

// Issue 15 §2: the epoch is persisted before the in-memory authority
// changes. When the persist fails, the volume does not serve at the
// epoch that is not on disk: the status keeps the old epoch, writes are
// refused, and the next successful Apply serves again.
func TestHostFailedPersistDoesNotServe(t *testing.T) {
	logs, log := newCapture()
	cfs := vfs.NewCrashFS()
	vol, err := blockvol.Create("/vols/v1", blockvol.Options{Size: testVolSize, WALSize: 8 << 20, FS: cfs})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	clk := &clock{t: time.Unix(1_000_000, 0)}
	h, _ := startHost(t, "srv-a", clk, log)
	h.AddVolume("v1", vol)
	lease := clk.t.Add(time.Hour)
	if err := h.Apply(Assignment{Volume: "v1", Role: RolePrimary, Epoch: 1, PrimaryID: "srv-a", LeaseUntil: lease, Durability: BestEffort}); err != nil {
		t.Fatal(err)
	}
	dev, _ := h.Device("v1")
	if err := dev.WriteAt(block4k(1), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := dev.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := vol.ReplCheckpoint(); err != nil {
		t.Fatal(err)
	}
	cfs.Inject(vfs.Fault{Op: vfs.OpSync, Name: blockvol.SuperblockFile, Err: syscall.EIO})
	err = h.Apply(Assignment{Volume: "v1", Role: RolePrimary, Epoch: 2, PrimaryID: "srv-a", LeaseUntil: lease.Add(time.Hour), Durability: BestEffort})
	if err == nil || !errors.Is(err, syscall.EIO) {
		t.Fatalf("apply with a failing superblock sync: %v", err)
	}
	logs.waitEvent(t, EvAuthorityPersistFailed, map[string]string{"volume": "v1", "epoch": "2", "kept_epoch": "1"})
	if st := h.Status(); st[0].Epoch != 1 {
		t.Fatalf("status reports epoch %d, which is not on disk", st[0].Epoch)
	}
	if err := dev.WriteAt(block4k(2), 0, false); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("write after the failed persist: %v (want ErrNotPrimary)", err)
	}
	if err := dev.Flush(); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("flush after the failed persist: %v (want ErrNotPrimary)", err)
	}
	cfs.ClearFaults()
	if err := h.Apply(Assignment{Volume: "v1", Role: RolePrimary, Epoch: 2, PrimaryID: "srv-a", LeaseUntil: lease.Add(time.Hour), Durability: BestEffort}); err != nil {
		t.Fatal(err)
	}
	if vol.Epoch() != 2 || h.Status()[0].Epoch != 2 {
		t.Fatalf("epoch after the retry: persisted %d, status %d", vol.Epoch(), h.Status()[0].Epoch)
	}
	if err := dev.WriteAt(block4k(3), 0, false); err != nil {
		t.Fatalf("write after the retry: %v", err)
	}
}

// Issue 15 §5: a Host's receiver keeps repl-lineage.json on the volume's
// own FS, durably (write, fsync, rename, directory sync): after a power
// cut of that FS the file is there. Before, it went to the OS file
// system at the volume's path, past the volume's FS.
func TestHostReplicaStateFilesOnVolumeFS(t *testing.T) {
	_, log := newCapture()
	cfs := vfs.NewCrashFS()
	rvol, err := blockvol.Create("/vols/v1", blockvol.Options{Size: testVolSize, WALSize: 8 << 20, FS: cfs})
	if err != nil {
		t.Fatal(err)
	}
	defer rvol.Close()
	clk := &clock{t: time.Unix(1_000_000, 0)}
	a := newNode(t, testVolSize)
	ha, _ := startHost(t, "srv-a", clk, log)
	hb, addrB := startHost(t, "srv-b", clk, log)
	ha.AddVolume("v1", a.vol)
	hb.AddVolume("v1", rvol)
	if err := hb.Apply(Assignment{Volume: "v1", Role: RoleReplica, Epoch: 1, PrimaryID: "srv-a"}); err != nil {
		t.Fatal(err)
	}
	if err := ha.Apply(Assignment{Volume: "v1", Role: RolePrimary, Epoch: 1, PrimaryID: "srv-a", LeaseUntil: clk.t.Add(time.Hour),
		Durability: SyncAll, Replicas: []Peer{{"srv-b", addrB}}, ActingSet: []string{"srv-b"}}); err != nil {
		t.Fatal(err)
	}
	pa, _ := ha.Primary("v1")
	waitState(t, pa, "srv-b", InSync)
	dev, _ := ha.Device("v1")
	if err := dev.WriteAt(block4k(7), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := dev.Flush(); err != nil {
		t.Fatalf("flush with the replica on a CrashFS: %v", err)
	}
	after := cfs.PowerCut(vfs.CutOptions{})
	f, err := after.OpenFile("/vols/v1/"+lineageFile, 0, 0)
	if err != nil {
		t.Fatalf("%s after a power cut of the volume's FS: %v (files: %v)", lineageFile, err, after.Files())
	}
	f.Close()
}
