package vfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func writeN(t *testing.T, f File, n int) []error {
	t.Helper()
	var errs []error
	for i := 0; i < n; i++ {
		_, err := f.WriteAt([]byte{byte(i)}, int64(i))
		errs = append(errs, err)
	}
	return errs
}

// TestErrorFSNthCallOnOS: on the real OS file system, the rule fails
// exactly the third and fourth write of *.wal with EIO, leaves other
// files and other operations alone, and the failed writes store nothing.
func TestErrorFSNthCallOnOS(t *testing.T) {
	dir := t.TempDir()
	e := NewErrorFS(Default, 1)
	e.AddRule(Rule{Ops: []Op{OpWrite}, Path: "*.wal", After: 2, Count: 2, Err: syscall.EIO})
	wal, err := e.OpenFile(filepath.Join(dir, "vol.wal"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer wal.Close()
	other, err := e.OpenFile(filepath.Join(dir, "vol.extent"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	errs := writeN(t, wal, 6)
	for i, err := range errs {
		want := i == 2 || i == 3
		if (err != nil) != want {
			t.Errorf("write %d: err %v, want failure %v", i, err, want)
		}
		if err != nil {
			var ie *InjectedError
			if !errors.Is(err, syscall.EIO) || !errors.As(err, &ie) || ie.Op != OpWrite || !strings.Contains(err.Error(), "vol.wal") {
				t.Errorf("write %d: error %v does not say injected EIO on vol.wal", i, err)
			}
		}
	}
	for i, err := range writeN(t, other, 6) {
		if err != nil {
			t.Errorf("write %d to another file failed: %v", i, err)
		}
	}
	if err := wal.Sync(); err != nil {
		t.Errorf("sync is not matched by a write rule: %v", err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "vol.wal"))
	if err != nil {
		t.Fatal(err)
	}
	if want := []byte{0, 1, 0, 0, 4, 5}; !bytes.Equal(b, want) {
		t.Errorf("file holds %v, want %v (failed writes store nothing)", b, want)
	}
	if e.Injected() != 2 {
		t.Errorf("Injected = %d, want 2", e.Injected())
	}
}

// TestErrorFSProbabilistic: a probability rule hits about that share of
// the operations, and the same seed hits the same ones.
func TestErrorFSProbabilistic(t *testing.T) {
	run := func(seed uint64) []bool {
		fs := NewErrorFS(NewCrashFS(), seed)
		fs.AddRule(Rule{Ops: []Op{OpSync}, Prob: 0.3, Err: syscall.ENOSPC})
		f, err := fs.OpenFile("/f", os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		var hits []bool
		for i := 0; i < 1000; i++ {
			err := f.Sync()
			if err != nil && !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("sync: %v", err)
			}
			hits = append(hits, err != nil)
		}
		return hits
	}
	a, b, c := run(7), run(7), run(8)
	n := 0
	for _, h := range a {
		if h {
			n++
		}
	}
	if n < 200 || n > 400 {
		t.Errorf("p=0.3 hit %d of 1000", n)
	}
	same, diff := true, false
	for i := range a {
		same = same && a[i] == b[i]
		diff = diff || a[i] != c[i]
	}
	if !same || !diff {
		t.Errorf("same seed same hits: %v; another seed other hits: %v", same, diff)
	}
}

// TestErrorFSPartialWrite: an ENOSPC write with Partial stores the first
// half of its data and reports the error.
func TestErrorFSPartialWrite(t *testing.T) {
	dir := t.TempDir()
	e := NewErrorFS(Default, 1)
	e.AddRule(Rule{Ops: []Op{OpWrite}, Path: dir + "/*", Err: syscall.ENOSPC, Partial: true, Count: 1})
	f, err := e.OpenFile(filepath.Join(dir, "x"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := f.WriteAt([]byte("abcdefgh"), 0)
	if !errors.Is(err, syscall.ENOSPC) || n != 4 {
		t.Fatalf("partial write: n=%d err=%v, want 4, ENOSPC", n, err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "x")); string(b) != "abcd" {
		t.Fatalf("file holds %q after a partial write", b)
	}
	if _, err := f.WriteAt([]byte("ijkl"), 4); err != nil {
		t.Fatalf("Count 1 rule hit twice: %v", err)
	}
}

// TestErrorFSLatencyAndPaths: latency-only rules delay without failing;
// whole-path patterns, rename's two names, namespace operations, removal
// of a rule.
func TestErrorFSLatencyAndPaths(t *testing.T) {
	dir := t.TempDir()
	e := NewErrorFS(Default, 1)
	slow := e.AddRule(Rule{Ops: []Op{OpSync}, Latency: 20 * time.Millisecond})
	f, err := e.OpenFile(filepath.Join(dir, "a"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if time.Since(start) < 20*time.Millisecond || e.Delayed() != 1 {
		t.Errorf("sync was not delayed (took %v, delayed %d)", time.Since(start), e.Delayed())
	}
	e.RemoveRule(slow)
	_ = f.Sync()
	if e.Delayed() != 1 {
		t.Errorf("removed rule still delays")
	}
	f.Close()

	e.AddRule(Rule{Ops: []Op{OpRename}, Path: filepath.Join(dir, "sub", "*"), Err: syscall.EIO})
	e.AddRule(Rule{Ops: []Op{OpMkdir, OpRemove}, Path: "nope*", Err: syscall.EIO})
	if err := e.MkdirAll(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := e.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "sub", "a")); !errors.Is(err, syscall.EIO) {
		t.Errorf("rename into sub/: %v, want EIO", err)
	}
	if err := e.Rename(filepath.Join(dir, "a"), filepath.Join(dir, "b")); err != nil {
		t.Errorf("rename elsewhere: %v", err)
	}
	if err := e.MkdirAll(filepath.Join(dir, "nope1"), 0o755); !errors.Is(err, syscall.EIO) {
		t.Errorf("mkdir nope1: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "nope1")); !os.IsNotExist(err) {
		t.Errorf("a failed mkdir created the directory: %v", err)
	}
	if err := e.SyncDir(dir); err != nil {
		t.Errorf("syncdir: %v", err)
	}
	e.ClearRules()
	if err := e.Rename(filepath.Join(dir, "b"), filepath.Join(dir, "sub", "b")); err != nil {
		t.Errorf("after ClearRules: %v", err)
	}
}

// TestErrorFSOverCrashFS: the wrapper composes with the crash file
// system: WriteFileAtomic fails cleanly at an injected fsync, and what
// it had written is gone after a power cut.
func TestErrorFSOverCrashFS(t *testing.T) {
	c := NewCrashFS()
	e := NewErrorFS(c, 1)
	if err := e.MkdirAll("/data", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(e, "/data/meta", []byte("one"), 0o644); err != nil {
		t.Fatal(err)
	}
	e.AddRule(Rule{Ops: []Op{OpSync}, Path: "meta.tmp.*", Err: syscall.EIO})
	err := WriteFileAtomic(e, "/data/meta", []byte("two"), 0o644)
	if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "fsync") {
		t.Fatalf("WriteFileAtomic with a failing fsync: %v", err)
	}
	after := c.PowerCut(CutOptions{})
	b, err := ReadFile(after, "/data/meta")
	if err != nil || string(b) != "one" {
		t.Fatalf("after the cut: %q, %v; want the old content", b, err)
	}
}

func TestParseRules(t *testing.T) {
	rules, err := ParseRules("write+sync:*.wal:eio,p=0.01,after=3; read:/data/*:delay,latency=5ms ;*::enospc,count=2,partial")
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) != 3 {
		t.Fatalf("%d rules", len(rules))
	}
	r := rules[0]
	if len(r.Ops) != 2 || r.Ops[1] != OpSync || r.Path != "*.wal" || r.Err != syscall.EIO || r.Prob != 0.01 || r.After != 3 {
		t.Errorf("rule 1: %+v", r)
	}
	if r := rules[1]; r.Err != nil || r.Latency != 5*time.Millisecond || r.Path != "/data/*" {
		t.Errorf("rule 2: %+v", r)
	}
	if r := rules[2]; r.Ops != nil || r.Err != syscall.ENOSPC || r.Count != 2 || !r.Partial {
		t.Errorf("rule 3: %+v", r)
	}
	for _, bad := range []struct{ spec, want string }{
		{"write:*", "OPS:PATH:ACTION"},
		{"scribble:*:eio", "unknown operation"},
		{"write:[:eio", "bad path pattern"},
		{"write:*:explode", "unknown action"},
		{"write:*:eio,p=2", "not in (0,1]"},
		{"write:*:eio,after=x", "after"},
		{"write:*:delay", "latency="},
		{"write:*:eio,colour=red", "unknown key"},
		{"write:*:eio,count=-1", "negative"},
	} {
		_, err := ParseRules(bad.spec)
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("ParseRules(%q) = %v, want an error about %q", bad.spec, err, bad.want)
		}
	}
}

func TestFaultsFromEnv(t *testing.T) {
	env := func(kv map[string]string) func(string) string {
		return func(k string) string { return kv[k] }
	}
	fs, err := FaultsFromEnv(Default, env(nil))
	if err != nil || fs != Default {
		t.Fatalf("unset: %v, %v", fs, err)
	}
	fs, err = FaultsFromEnv(Default, env(map[string]string{FaultsEnv: "sync:*:enospc", FaultsSeedEnv: "9"}))
	if err != nil {
		t.Fatal(err)
	}
	f, err := fs.OpenFile(filepath.Join(t.TempDir(), "x"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("sync under %s: %v", FaultsEnv, err)
	}
	for _, bad := range []map[string]string{
		{FaultsEnv: "sync:*:boom"},
		{FaultsEnv: " ; "},
		{FaultsEnv: "sync:*:eio", FaultsSeedEnv: "x"},
	} {
		if _, err := FaultsFromEnv(Default, env(bad)); err == nil || !strings.Contains(err.Error(), "BLOCKD_VFS_FAULTS") {
			t.Errorf("%v: error %v does not name the variable", bad, err)
		}
	}
}
