package blockvol

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
)

func snapCyclesWanted() int {
	if *crashCycles > 0 {
		return *crashCycles
	}
	if s := os.Getenv("BLOCKVOL_CRASH_CYCLES"); s != "" {
		if n, err := strconv.Atoi(s); err == nil && n > 0 {
			return n
		}
	}
	if testing.Short() {
		return 40
	}
	return 150
}

// snapOp is a snapshot operation whose outcome a power cut left unknown.
type snapOp struct {
	kind    string // "create", "delete", "restore"
	name    string
	content []version // create: the snapshot's content
}

// snapCrashModel extends crashModel (live blocks) with the snapshots.
type snapCrashModel struct {
	*crashModel
	nblocks int
	snaps   map[string][]version // committed
	pending *snapOp
	seq     int
	trace   func(format string, args ...any)
	// cut is set just before the power cut: after it an op may fail
	// without failing the volume (a read-modify-write whose read hits
	// the dead disk), and a later Flush with nothing new to sync would
	// still succeed, so the run must stop instead of trusting it.
	cut atomic.Bool
}

func (m *snapCrashModel) note(format string, args ...any) {
	if m.trace != nil {
		m.trace("model: "+format, args...)
	}
}

func (m *snapCrashModel) current() []version {
	out := make([]version, m.nblocks)
	for b := range out {
		h := m.blocks[b].history
		out[b] = h[len(h)-1]
	}
	return out
}

func (m *snapCrashModel) allDurable() {
	for b := range m.blocks {
		m.blocks[b].durable = len(m.blocks[b].history) - 1
	}
}

func (m *snapCrashModel) pick(r *rand.Rand) string {
	names := make([]string, 0, len(m.snaps))
	for n := range m.snaps {
		names = append(names, n)
	}
	if len(names) == 0 {
		return ""
	}
	slices.Sort(names)
	return names[r.IntN(len(names))]
}

// run does random writes and snapshot operations until one fails (the
// power cut) or ops are done.
func (m *snapCrashModel) run(v *Volume, r *rand.Rand, ops int) {
	for i := 0; i < ops; i++ {
		if v.failErr() != nil || m.cut.Load() {
			return
		}
		switch k := r.IntN(12); {
		case k < 7:
			crashWriter(v, m.crashModel, 0, m.nblocks, r, 1+r.IntN(10), false)
		case k < 9 || len(m.snaps) == 0:
			m.seq++
			op := &snapOp{kind: "create", name: fmt.Sprintf("s%d", m.seq), content: m.current()}
			m.pending = op
			_, err := v.CreateSnapshot(op.name, SnapshotOptions{})
			m.note("create %s: %v", op.name, err)
			if err != nil {
				return
			}
			m.pending = nil
			m.snaps[op.name] = op.content
			m.allDurable()
		case k < 11 || len(m.snaps) > 5:
			op := &snapOp{kind: "delete", name: m.pick(r)}
			m.pending = op
			// Writes go on during a delete (it does not block I/O).
			var wg sync.WaitGroup
			wg.Add(1)
			wr := rand.New(rand.NewPCG(r.Uint64(), 2))
			go func() {
				defer wg.Done()
				crashWriter(v, m.crashModel, 0, m.nblocks, wr, 1+wr.IntN(20), false)
			}()
			err := v.DeleteSnapshot(op.name)
			wg.Wait()
			m.note("delete %s: %v", op.name, err)
			if err != nil {
				return
			}
			m.pending = nil
			delete(m.snaps, op.name)
		default:
			op := &snapOp{kind: "restore", name: m.pick(r)}
			content := m.snaps[op.name]
			for b := range m.blocks {
				m.blocks[b].history = append(m.blocks[b].history, content[b])
			}
			m.pending = op
			err := v.RestoreSnapshot(op.name)
			m.note("restore %s: %v", op.name, err)
			if err != nil {
				return
			}
			m.pending = nil
			m.allDurable()
		}
	}
}

// verifySnaps checks the snapshots after a reopen: every committed one
// present with exactly its content, an interrupted create or delete
// either done or not, nothing else; then takes what it found as the new
// committed set.
func (m *snapCrashModel) verifySnaps(v *Volume) error {
	found := map[string]bool{}
	for _, in := range v.Snapshots() {
		found[in.Name] = true
	}
	want := map[string][]version{}
	for n, c := range m.snaps {
		want[n] = c
	}
	if p := m.pending; p != nil {
		switch p.kind {
		case "create":
			if found[p.name] {
				want[p.name] = p.content
			}
		case "delete":
			if !found[p.name] {
				delete(want, p.name)
			}
		}
	}
	for n := range found {
		if want[n] == nil {
			return fmt.Errorf("snapshot %q exists; model has %v (pending %+v)", n, keys(m.snaps), m.pending)
		}
	}
	for n, c := range want {
		if !found[n] {
			return fmt.Errorf("snapshot %q lost (pending %+v)", n, m.pending)
		}
		r, err := v.OpenSnapshot(n)
		if err != nil {
			return err
		}
		buf := make([]byte, m.nblocks*4096)
		err = r.ReadAt(buf, 0)
		r.Close()
		if err != nil {
			return fmt.Errorf("read snapshot %q: %w", n, err)
		}
		for b := 0; b < m.nblocks; b++ {
			var got version
			for s := 0; s < spb; s++ {
				tag, err := decodeSector(buf[b*4096+s*512:], uint64(b), s)
				if err != nil {
					return fmt.Errorf("snapshot %q: %w", n, err)
				}
				got[s] = tag
			}
			if got != c[b] {
				return fmt.Errorf("snapshot %q block %d reads %v, want %v", n, b, got, c[b])
			}
		}
	}
	m.snaps, m.pending = want, nil
	return nil
}

type traceWriter struct{ tr *tracer }

func (w traceWriter) Write(p []byte) (int, error) {
	w.tr.add("%s", strings.TrimSpace(string(p)))
	return len(p), nil
}

func keys(m map[string][]version) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// TestPowerCutSnapshots: random writes, trims, flushes and snapshot
// create, delete and restore, with a power cut at a random file operation
// (unsynced writes dropped, kept, or kept with the last one torn) and a
// reopen. After every cut the live blocks read as an allowed version, each
// committed snapshot reads exactly as it was taken, and an interrupted
// snapshot operation is either wholly done or not at all.
func TestPowerCutSnapshots(t *testing.T) {
	cycles := snapCyclesWanted()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("BLOCKVOL_CRASH_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (BLOCKVOL_CRASH_SEED), %d cycles", seed, cycles)
	r := rand.New(rand.NewPCG(seed, 43))
	const nblocks = 64
	fs := vfs.NewCrashFS()
	// The default WAL-full timeout: a write may only fail because of the
	// cut (which wakes waiting writers at once), never because the log
	// was full for a while, as the model then takes it as done.
	opts := Options{Size: nblocks * 4096, WALSize: 64 << 10, FS: fs, Logger: testLogger(t)}
	v, err := Create("/vol", opts)
	if err != nil {
		t.Fatal(err)
	}
	m := &snapCrashModel{crashModel: &crashModel{blocks: make([]blockModel, nblocks)}, nblocks: nblocks, snaps: map[string][]version{}}
	for b := range m.blocks {
		m.blocks[b].history = []version{{}}
	}
	interrupted := map[string]int{}
	tr := &tracer{}
	if os.Getenv("BLOCKVOL_TRACE") != "" {
		m.trace = tr.add
		opts.Logger = slog.New(slog.NewTextHandler(traceWriter{tr}, nil))
	}
	for c := 0; c < cycles; c++ {
		m.cut.Store(false)
		var wg sync.WaitGroup
		wg.Add(1)
		opsR := rand.New(rand.NewPCG(r.Uint64(), 1))
		nops := 5 + r.IntN(30)
		go func() {
			defer wg.Done()
			m.run(v, opsR, nops)
		}()
		clean := r.IntN(10) == 0
		if !clean {
			waitOps(fs, fs.Ops()+int64(r.IntN(400)), &wg, 20*time.Microsecond)
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
		} else {
			wg.Wait()
			if err := v.Close(); err != nil {
				t.Fatalf("cycle %d: clean close: %v", c, err)
			}
		}
		if m.pending != nil {
			interrupted[m.pending.kind]++
		}
		opts.FS = fs
		tr.add("---- cycle %d clean %v pending %+v", c, clean, m.pending)
		v, err = openTraced("/vol", opts, tr)
		if err != nil {
			t.Fatalf("cycle %d: recovery failed (pending %+v): %v", c, m.pending, err)
		}
		pending := m.pending
		if err := m.verifySnaps(v); err != nil {
			t.Fatalf("cycle %d: %v", c, err)
		}
		if err := m.verify(v, nblocks); err != nil {
			t.Log(debugDump(v))
			if f := os.Getenv("BLOCKVOL_TRACE"); f != "" {
				os.WriteFile(f, []byte(strings.Join(tr.lines, "\n")), 0o644)
			}
			t.Fatalf("cycle %d (pending %+v): live: %v", c, pending, err)
		}
	}
	v.Close()
	t.Logf("%d cycles; interrupted snapshot operations: %v; %d snapshots at the end", cycles, interrupted, len(m.snaps))
}
