package replication

import (
	"errors"
	"testing"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
)

const testVolSize = 16 << 20

func newVol(t *testing.T) (*blockvol.Volume, string) {
	t.Helper()
	dir := t.TempDir()
	v, err := blockvol.Create(dir, blockvol.Options{Size: testVolSize})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v, dir
}

func TestShipFlushSyncAll(t *testing.T) {
	logs, log := newCapture()
	rs := startReplServer(t, "srv-b", log)
	rvol, rdir := newVol(t)
	rs.set("v1", rvol, 1, rdir)
	pvol, _ := newVol(t)
	p, err := NewPrimary(pvol, PrimaryConfig{Volume: "v1", ServerID: testPrimaryID, Epoch: 1, Durability: SyncAll,
		Replicas: []Peer{{ServerID: "srv-b", Addr: rs.addr}}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	waitState(t, p, "srv-b", InSync)
	for i := int64(0); i < 200; i++ {
		if err := p.WriteAt(pattern(i%50, int(i)), (i%50)*4096, false); err != nil {
			t.Fatal(err)
		}
		if i%10 == 9 {
			if err := p.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := p.WriteAt(pattern(60, 1), 60*4096, true); err != nil {
		t.Fatal(err)
	}
	st, _ := replicaState(p, "srv-b")
	if st.FlushedLSN < pvol.HeadLSN() {
		t.Fatalf("after a sync_all FUA write the replica's FlushedLSN %d < head %d", st.FlushedLSN, pvol.HeadLSN())
	}
	sameData(t, pvol, rvol)
	logs.waitEvent(t, EvPlanChosen, map[string]string{"replica": "srv-b"})
	logs.waitEvent(t, EvSessionCreated, map[string]string{"replica": "srv-b"})

	// The write gate refuses writes and flushes.
	gateErr := errors.New("lease expired")
	p.cfg.WriteGate = func() error { return gateErr }
	if err := p.WriteAt(pattern(1, 1), 0, false); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("write without lease: %v", err)
	}
	if err := p.Flush(); !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("flush without lease: %v", err)
	}
}
