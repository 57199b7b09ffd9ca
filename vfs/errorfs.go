package vfs

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Operations ErrorFS can match besides those of CrashFS faults.
const (
	OpClose     Op = "close"
	OpStat      Op = "stat"
	OpMkdir     Op = "mkdir"
	OpRemoveAll Op = "removeall"
	OpAllocated Op = "allocated"
)

var allOps = []Op{OpOpen, OpRead, OpWrite, OpSync, OpTruncate, OpPunch, OpAllocate, OpRemove, OpRename,
	OpSyncDir, OpClose, OpStat, OpMkdir, OpRemoveAll, OpAllocated}

// Rule says which operations of an ErrorFS misbehave and how.
type Rule struct {
	// Ops the rule applies to (nil: every operation).
	Ops []Op
	// Path is a filepath.Match pattern. A pattern with a '/' is matched
	// against the whole cleaned path, one without against the base name
	// ("" or "*" matches everything). A rename matches on either name.
	Path string
	// After lets this many matching operations pass untouched first.
	After int
	// Count limits how many operations the rule hits (0: no limit).
	Count int
	// Prob is the probability that a matching operation past After is
	// hit (0 or 1: every one). Draws come from the ErrorFS's seed.
	Prob float64
	// Latency is slept before a hit operation runs.
	Latency time.Duration
	// Err is returned by a hit operation instead of running it (nil:
	// latency only), e.g. syscall.EIO or syscall.ENOSPC.
	Err error
	// Partial makes a hit write store the first half of its data before
	// it fails with Err, as a device that filled up mid-write.
	Partial bool
}

// InjectedError is the error an ErrorFS returns; errors.Is sees the
// errno it carries (syscall.EIO, syscall.ENOSPC).
type InjectedError struct {
	Op   Op
	Path string
	Err  error
}

func (e *InjectedError) Error() string {
	return fmt.Sprintf("vfs: injected %s %s: %v", e.Op, e.Path, e.Err)
}

func (e *InjectedError) Unwrap() error { return e.Err }

type ruleState struct {
	Rule
	id         int
	seen, hits int
}

// ErrorFS wraps any FS (the OS one included) and injects errors and
// latency per operation and per path, as the rules added to it say. Rules
// are checked in the order they were added; the first that hits decides
// an error (latencies of every hit add up). It is safe for concurrent use.
type ErrorFS struct {
	fs       FS
	mu       sync.Mutex
	rng      *rand.Rand
	rules    []*ruleState
	nextID   int
	injected atomic.Int64
	delayed  atomic.Int64
}

// NewErrorFS wraps fs; seed drives the probabilistic rules.
func NewErrorFS(fs FS, seed uint64) *ErrorFS {
	return &ErrorFS{fs: fs, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// AddRule adds a rule and returns its id (for RemoveRule).
func (e *ErrorFS) AddRule(r Rule) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.nextID++
	e.rules = append(e.rules, &ruleState{Rule: r, id: e.nextID})
	return e.nextID
}

// RemoveRule drops the rule with that id.
func (e *ErrorFS) RemoveRule(id int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for i, r := range e.rules {
		if r.id == id {
			e.rules = append(e.rules[:i:i], e.rules[i+1:]...)
			return
		}
	}
}

// ClearRules drops every rule.
func (e *ErrorFS) ClearRules() {
	e.mu.Lock()
	e.rules = nil
	e.mu.Unlock()
}

// Injected is how many operations failed by a rule so far.
func (e *ErrorFS) Injected() int64 { return e.injected.Load() }

// Delayed is how many operations were delayed by a rule so far.
func (e *ErrorFS) Delayed() int64 { return e.delayed.Load() }

func matchPath(pattern, name string) bool {
	if pattern == "" || pattern == "*" {
		return true
	}
	name = filepath.Clean(name)
	if !strings.Contains(pattern, "/") {
		name = filepath.Base(name)
	}
	ok, err := filepath.Match(pattern, name)
	return err == nil && ok
}

func (r *ruleState) matches(op Op, names []string) bool {
	if len(r.Ops) > 0 {
		found := false
		for _, o := range r.Ops {
			if o == op {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	for _, n := range names {
		if matchPath(r.Path, n) {
			return true
		}
	}
	return false
}

// hit decides what happens to one operation: the latency to sleep, the
// error to return and whether a write is to be partial.
func (e *ErrorFS) hit(op Op, names ...string) (time.Duration, bool, error) {
	e.mu.Lock()
	var lat time.Duration
	var err error
	partial := false
	for _, r := range e.rules {
		if !r.matches(op, names) {
			continue
		}
		r.seen++
		if r.seen <= r.After || (r.Count > 0 && r.hits >= r.Count) {
			continue
		}
		if r.Prob > 0 && r.Prob < 1 && e.rng.Float64() >= r.Prob {
			continue
		}
		r.hits++
		lat += r.Latency
		if err == nil && r.Err != nil {
			err = &InjectedError{Op: op, Path: names[0], Err: r.Err}
			partial = r.Partial
		}
	}
	e.mu.Unlock()
	return lat, partial, err
}

// before runs at the start of every operation: it sleeps and returns the
// injected error, if any.
func (e *ErrorFS) before(op Op, names ...string) error {
	lat, _, err := e.hit(op, names...)
	e.wait(lat)
	if err != nil {
		e.injected.Add(1)
	}
	return err
}

func (e *ErrorFS) wait(lat time.Duration) {
	if lat > 0 {
		e.delayed.Add(1)
		time.Sleep(lat)
	}
}

func (e *ErrorFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	if err := e.before(OpOpen, name); err != nil {
		return nil, err
	}
	f, err := e.fs.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &errorFile{f: f, e: e, name: name}, nil
}

func (e *ErrorFS) Remove(name string) error {
	if err := e.before(OpRemove, name); err != nil {
		return err
	}
	return e.fs.Remove(name)
}

func (e *ErrorFS) RemoveAll(path string) error {
	if err := e.before(OpRemoveAll, path); err != nil {
		return err
	}
	return e.fs.RemoveAll(path)
}

func (e *ErrorFS) Rename(oldname, newname string) error {
	if err := e.before(OpRename, oldname, newname); err != nil {
		return err
	}
	return e.fs.Rename(oldname, newname)
}

func (e *ErrorFS) MkdirAll(dir string, perm os.FileMode) error {
	if err := e.before(OpMkdir, dir); err != nil {
		return err
	}
	return e.fs.MkdirAll(dir, perm)
}

func (e *ErrorFS) Stat(name string) (os.FileInfo, error) {
	if err := e.before(OpStat, name); err != nil {
		return nil, err
	}
	return e.fs.Stat(name)
}

func (e *ErrorFS) SyncDir(dir string) error {
	if err := e.before(OpSyncDir, dir); err != nil {
		return err
	}
	return e.fs.SyncDir(dir)
}

type errorFile struct {
	f    File
	e    *ErrorFS
	name string
}

func (f *errorFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.e.before(OpRead, f.name); err != nil {
		return 0, err
	}
	return f.f.ReadAt(p, off)
}

func (f *errorFile) WriteAt(p []byte, off int64) (int, error) {
	lat, partial, err := f.e.hit(OpWrite, f.name)
	f.e.wait(lat)
	if err == nil {
		return f.f.WriteAt(p, off)
	}
	f.e.injected.Add(1)
	if partial && len(p) > 1 {
		n, werr := f.f.WriteAt(p[:len(p)/2], off)
		if werr != nil {
			return n, werr
		}
		return n, err
	}
	return 0, err
}

func (f *errorFile) Close() error {
	if err := f.e.before(OpClose, f.name); err != nil {
		// The descriptor is released anyway, as close(2) does.
		_ = f.f.Close()
		return err
	}
	return f.f.Close()
}

func (f *errorFile) Sync() error {
	if err := f.e.before(OpSync, f.name); err != nil {
		return err
	}
	return f.f.Sync()
}

func (f *errorFile) Truncate(size int64) error {
	if err := f.e.before(OpTruncate, f.name); err != nil {
		return err
	}
	return f.f.Truncate(size)
}

func (f *errorFile) Stat() (os.FileInfo, error) {
	if err := f.e.before(OpStat, f.name); err != nil {
		return nil, err
	}
	return f.f.Stat()
}

func (f *errorFile) PunchHole(off, length int64) error {
	if err := f.e.before(OpPunch, f.name); err != nil {
		return err
	}
	return f.f.PunchHole(off, length)
}

func (f *errorFile) Allocated(off, length int64) ([]Range, error) {
	if err := f.e.before(OpAllocated, f.name); err != nil {
		return nil, err
	}
	return f.f.Allocated(off, length)
}

func (f *errorFile) Allocate(off, length int64) error {
	if err := f.e.before(OpAllocate, f.name); err != nil {
		return err
	}
	return f.f.Allocate(off, length)
}

// ParseRules reads rules from a compact text form, so a process can be
// given faults from its environment or a flag. Rules are separated by
// ';'; each is OPS:PATH:ACTION[,KEY=VALUE...] where OPS is '*' or ops
// joined by '+' (write+sync), PATH a pattern as Rule.Path, ACTION one of
// eio, enospc, delay (latency only), and the keys are after, count
// (integers), p (a probability in (0,1]), latency (a Go duration) and
// partial (no value). Example:
//
//	write+sync:*.wal:eio,p=0.01;read:*:delay,latency=5ms
func ParseRules(spec string) ([]Rule, error) {
	var rules []Rule
	for i, part := range strings.Split(spec, ";") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		r, err := parseRule(part)
		if err != nil {
			return nil, fmt.Errorf("vfs: fault rule %d %q: %w", i+1, part, err)
		}
		rules = append(rules, r)
	}
	return rules, nil
}

func parseRule(s string) (Rule, error) {
	var r Rule
	f := strings.SplitN(s, ":", 3)
	if len(f) != 3 {
		return r, fmt.Errorf("want OPS:PATH:ACTION")
	}
	if f[0] != "*" {
		for _, o := range strings.Split(f[0], "+") {
			op := Op(o)
			known := false
			for _, k := range allOps {
				known = known || k == op
			}
			if !known {
				return r, fmt.Errorf("unknown operation %q (known: %v)", o, allOps)
			}
			r.Ops = append(r.Ops, op)
		}
	}
	r.Path = f[1]
	if _, err := filepath.Match(r.Path, ""); err != nil {
		return r, fmt.Errorf("bad path pattern %q: %w", r.Path, err)
	}
	args := strings.Split(f[2], ",")
	switch args[0] {
	case "eio":
		r.Err = syscall.EIO
	case "enospc":
		r.Err = syscall.ENOSPC
	case "delay":
	default:
		return r, fmt.Errorf("unknown action %q (eio, enospc, delay)", args[0])
	}
	for _, kv := range args[1:] {
		k, v, _ := strings.Cut(kv, "=")
		var err error
		switch k {
		case "after":
			r.After, err = strconv.Atoi(v)
		case "count":
			r.Count, err = strconv.Atoi(v)
		case "p":
			r.Prob, err = strconv.ParseFloat(v, 64)
			if err == nil && (r.Prob <= 0 || r.Prob > 1) {
				err = fmt.Errorf("probability %v not in (0,1]", r.Prob)
			}
		case "latency":
			r.Latency, err = time.ParseDuration(v)
		case "partial":
			r.Partial = true
		default:
			err = fmt.Errorf("unknown key (after, count, p, latency, partial)")
		}
		if err != nil {
			return r, fmt.Errorf("%s: %w", k, err)
		}
		if r.After < 0 || r.Count < 0 || r.Latency < 0 {
			return r, fmt.Errorf("%s: negative value", k)
		}
	}
	if args[0] == "delay" && r.Latency == 0 {
		return r, fmt.Errorf("delay needs latency=DURATION")
	}
	return r, nil
}
