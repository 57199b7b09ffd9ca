package blockvol

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
)

// TestReplDropSnapshots: dropping some snapshots (the newest, one in the
// middle, the oldest) writes no record, leaves every kept one reading as
// it was taken (also what it read through a dropped newer one), gives
// the files' space back, survives a reopen (the records still in the WAL
// do not bring the dropped ones back) and lets later records and
// installs go on.
func TestReplDropSnapshots(t *testing.T) {
	const size = 1 << 20
	v, dir := newVol(t, size, 4<<20)
	m := newSnapModel(size)
	rng := rand.New(rand.NewPCG(3, 9))
	for k := 0; k < 6; k++ {
		for i := 0; i < 40; i++ {
			off := int64(rng.IntN(size/4096-2)) * 4096
			m.write(t, v, pattern(uint64(k*100+i), 8192), off)
		}
		if k%2 == 1 {
			flushAll(t, v) // the newer snapshots hold preserved blocks
		}
		m.create(t, v, fmt.Sprintf("s%d", k))
	}
	m.write(t, v, pattern(7777, 64<<10), 0)
	flushAll(t, v)
	m.check(t, v)
	held := map[string]SnapshotInfo{}
	for _, in := range v.Snapshots() {
		held[in.Name] = in
	}
	if held["s5"].HeldBytes <= snapHdrSize {
		t.Fatalf("the newest snapshot holds no preserved block (%d bytes): the test checks nothing", held["s5"].HeldBytes)
	}
	head := v.HeadLSN()
	drop := map[string]bool{"s0": true, "s2": true, "s3": true, "s5": true}
	got, err := v.ReplDropSnapshots(func(in SnapshotInfo) bool { return !drop[in.Name] })
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, in := range got {
		names = append(names, in.Name)
	}
	if !slices.Equal(names, []string{"s0", "s2", "s3", "s5"}) {
		t.Fatalf("dropped %v", names)
	}
	if v.HeadLSN() != head {
		t.Fatalf("drop wrote records: head %d -> %d", head, v.HeadLSN())
	}
	for n := range drop {
		delete(m.snaps, n)
		if _, err := os.Stat(filepath.Join(dir, SnapshotFile(held[n].ID))); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("snapshot %s's file still there: %v", n, err)
		}
		if _, err := v.OpenSnapshot(n); !errors.Is(err, ErrSnapshotNotFound) {
			t.Fatalf("open dropped %s: %v", n, err)
		}
	}
	m.check(t, v)
	// Nothing to drop: nothing happens.
	if got, err := v.ReplDropSnapshots(func(SnapshotInfo) bool { return true }); err != nil || len(got) != 0 {
		t.Fatalf("drop nothing: %v, %v", got, err)
	}
	// Reopened (with the snapshot records still after the checkpoint):
	// the same set.
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := Open(dir, Options{Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	m.check(t, v2)
	m.write(t, v2, pattern(8888, 16384), 4096)
	flushAll(t, v2)
	m.create(t, v2, "after")
	m.check(t, v2)
	// All of them.
	if _, err := v2.ReplDropSnapshots(func(SnapshotInfo) bool { return false }); err != nil {
		t.Fatal(err)
	}
	m.snaps = map[string][]byte{}
	m.check(t, v2)
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if filepath.Ext(e.Name()) == ".cow" {
			t.Fatalf("snapshot file %s left after dropping every snapshot", e.Name())
		}
	}
}

// TestPowerCutSnapshotDrop: the power-cut model of TestPowerCutSnapshots
// with ReplDropSnapshots among the operations. After every cut an
// interrupted drop is all done or not at all, and every snapshot left
// reads exactly as it was taken.
func TestPowerCutSnapshotDrop(t *testing.T) {
	cycles := snapCyclesWanted()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("BLOCKVOL_CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (BLOCKVOL_CRASH_SEED), %d cycles", seed, cycles)
	r := rand.New(rand.NewPCG(seed, 44))
	const nblocks = 64
	fs := vfs.NewCrashFS()
	opts := Options{Size: nblocks * 4096, WALSize: 64 << 10, FS: fs, Logger: testLogger(t)}
	v, err := Create("/vol", opts)
	if err != nil {
		t.Fatal(err)
	}
	m := &snapCrashModel{crashModel: &crashModel{blocks: make([]blockModel, nblocks)}, nblocks: nblocks, snaps: map[string][]version{}}
	for b := range m.blocks {
		m.blocks[b].history = []version{{}}
	}
	var pendingDrop []string // names of an interrupted drop
	drops, interrupted := 0, 0
	run := func(v *Volume, r *rand.Rand, ops int) {
		for i := 0; i < ops; i++ {
			if v.failErr() != nil || m.cut.Load() {
				return
			}
			switch k := r.IntN(10); {
			case k < 5:
				crashWriter(v, m.crashModel, 0, m.nblocks, r, 1+r.IntN(10), false)
			case k < 8 || len(m.snaps) == 0:
				m.seq++
				op := &snapOp{kind: "create", name: fmt.Sprintf("s%d", m.seq), content: m.current()}
				m.pending = op
				if _, err := v.CreateSnapshot(op.name, SnapshotOptions{}); err != nil {
					return
				}
				m.pending = nil
				m.snaps[op.name] = op.content
				m.allDurable()
			default:
				drop := map[string]bool{}
				for _, n := range keys(m.snaps) {
					if r.IntN(2) == 0 || len(m.snaps) > 6 && r.IntN(3) == 0 {
						drop[n] = true
					}
				}
				pendingDrop = []string{}
				for n := range drop {
					pendingDrop = append(pendingDrop, n)
				}
				if _, err := v.ReplDropSnapshots(func(in SnapshotInfo) bool { return !drop[in.Name] }); err != nil {
					return
				}
				for n := range drop {
					delete(m.snaps, n)
				}
				pendingDrop = nil
				drops++
			}
		}
	}
	for c := 0; c < cycles; c++ {
		m.cut.Store(false)
		var wg sync.WaitGroup
		wg.Add(1)
		opsR := rand.New(rand.NewPCG(r.Uint64(), 1))
		nops := 5 + r.IntN(30)
		go func() { defer wg.Done(); run(v, opsR, nops) }()
		doneCh := make(chan struct{})
		go func() { wg.Wait(); close(doneCh) }()
		target := fs.Ops() + int64(r.IntN(400))
	wait:
		for fs.Ops() < target {
			select {
			case <-doneCh:
				break wait
			default:
				time.Sleep(20 * time.Microsecond)
			}
		}
		var cut vfs.CutOptions
		switch r.IntN(3) {
		case 1:
			cut = vfs.CutOptions{KeepProb: 0.5, Tear: true}
		case 2:
			cut = vfs.CutOptions{KeepProb: 0.9}
		}
		cut.Rand = rand.New(rand.NewPCG(r.Uint64(), 7))
		m.cut.Store(true)
		fs = fs.PowerCut(cut)
		v.fail(errors.New("test: power cut"))
		wg.Wait()
		v.Close()
		opts.FS = fs
		v, err = Open("/vol", opts)
		if err != nil {
			t.Fatalf("cycle %d: recovery failed (pending drop %v): %v", c, pendingDrop, err)
		}
		if pendingDrop != nil {
			interrupted++
			found := map[string]bool{}
			for _, in := range v.Snapshots() {
				found[in.Name] = true
			}
			n := 0
			for _, name := range pendingDrop {
				if found[name] {
					n++
				}
			}
			switch n {
			case 0:
				for _, name := range pendingDrop {
					delete(m.snaps, name)
				}
			case len(pendingDrop):
			default:
				t.Fatalf("cycle %d: a drop of %v cut half way: %d of them still there (%v)", c, pendingDrop, n, v.Snapshots())
			}
			pendingDrop = nil
		}
		if err := m.verifySnaps(v); err != nil {
			t.Fatalf("cycle %d: %v", c, err)
		}
		if err := m.verify(v, nblocks); err != nil {
			t.Fatalf("cycle %d: live: %v", c, err)
		}
	}
	v.Close()
	t.Logf("%d cycles, %d drops done, %d interrupted by the cut; %d snapshots at the end", cycles, drops, interrupted, len(m.snaps))
}
