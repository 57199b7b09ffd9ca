package master

import (
	"fmt"
	"regexp"
	"sort"

	"github.com/blockd/blockd/api"
)

// Size limits and defaults of volume policy.
const (
	DefaultBlockSize = 4096
	MinWALSize       = 1 << 20
	MaxWALSize       = 64 << 30 // a WAL is allocated up front on every copy
	MaxVolumeSize    = 256 << 40
	MaxRF            = 8
)

// DefaultWALSize is the one WAL default: the engine's own
// (blockvol.DefaultWALSize, which the import rule keeps the master from
// naming), chosen for sustained writes at disk speed. The flusher frees
// space in 32 MiB batches however large the log is, so the log's size does
// not pace sustained writes; it is what absorbs a burst (2.5 s at 200 MB/s:
// the flusher starts at half of it) without writers waiting, what a lagging
// replica catches up from instead of a rebuild (retention keeps up to half
// of it), and the window in which rewrites of a block reach the extent
// once. A 64 MiB log filled in a third of a second under 4 KiB random
// writes and every writer then waited for the flusher. A volume smaller
// than half of it gets twice its size (walSizeFor), as in the engine.
// LargeWALSize (database, throughput) derives from it: twice the burst and
// the replica catch-up window.
const (
	DefaultWALSize = 1 << 30
	LargeWALSize   = 2 * DefaultWALSize
)

// Preset is a named volume policy. Fields of a request override it.
type Preset struct {
	Name       string
	Durability string
	RF         int
	WALSize    int64
	// MinCopies: 0 = DefaultMinCopies for the resolved RF and durability.
	MinCopies int
}

// DefaultMinCopies is the floor of durable copies a flush needs when the
// request and the preset leave it unset: 2 for RF >= 3 under sync_all and
// sync_quorum (a flush survives the loss of any one server, like Ceph's
// min_size 2 of size 3); 1 for RF <= 2 and for best_effort. RF 2 with 1
// is DRBD's choice: when the peer dies the primary outdates it (it leaves
// the acting set, stale) and goes on alone; that is safe because a stale
// member is never promoted automatically.
func DefaultMinCopies(rf int, durability string) int {
	if rf >= 3 && durability != api.DurabilityBestEffort {
		return 2
	}
	return 1
}

// ValidateMinCopies checks 1 <= n <= rf.
func ValidateMinCopies(n, rf int) *api.Error {
	if n < 1 || n > rf {
		return api.Errorf(api.CodeBadRequest, "min_copies %d out of range 1..%d (the volume's rf)", n, rf)
	}
	return nil
}

// Presets are the built-in policies (README.md lists them).
var Presets = map[string]Preset{
	"database":   {Name: "database", Durability: api.DurabilitySyncAll, RF: 2, WALSize: LargeWALSize},
	"general":    {Name: "general", Durability: api.DurabilityBestEffort, RF: 2, WALSize: DefaultWALSize},
	"throughput": {Name: "throughput", Durability: api.DurabilityBestEffort, RF: 2, WALSize: LargeWALSize},
}

// PresetNames returns the preset names, sorted.
func PresetNames() []string {
	var n []string
	for k := range Presets {
		n = append(n, k)
	}
	sort.Strings(n)
	return n
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidateName checks a volume name (it is also the NBD export name).
func ValidateName(name string) *api.Error {
	if !nameRE.MatchString(name) {
		return api.Errorf(api.CodeBadRequest, "invalid volume name %s: 1-64 characters of [A-Za-z0-9._-], starting with a letter or digit", api.QuoteName(name))
	}
	return nil
}

func validDurability(d string) bool {
	switch d {
	case api.DurabilityBestEffort, api.DurabilitySyncAll, api.DurabilitySyncQuorum:
		return true
	}
	return false
}

// Resolve turns a create request into a complete policy: preset values,
// overridden field by field by the request, defaults for the rest, with
// warnings where the result departs from the preset or cannot be met as
// well as asked, and errors where create would fail. servers is the number
// of registered volume servers (RF may not exceed it). It is pure: resolve
// (the dry run) and create share it.
func Resolve(req api.CreateVolumeRequest, servers int) api.ResolveResponse {
	out := api.ResolveResponse{Warnings: []api.Warning{}, Errors: []api.Error{}}
	fail := func(code, f string, a ...any) { out.Errors = append(out.Errors, *api.Errorf(code, f, a...)) }
	warn := func(code, f string, a ...any) {
		out.Warnings = append(out.Warnings, api.Warning{Code: code, Message: fmt.Sprintf(f, a...)})
	}

	var p Preset
	if req.Preset != "" {
		var ok bool
		if p, ok = Presets[req.Preset]; !ok {
			fail(api.CodeUnknownPreset, "unknown preset %s (known: %v)", api.QuoteName(req.Preset), PresetNames())
		}
	}
	pol := api.ResolvedPolicy{Preset: req.Preset, SizeBytes: req.SizeBytes, BlockSize: req.BlockSize,
		RF: req.RF, Durability: req.Durability, WALSizeBytes: req.WALSizeBytes}

	// block size
	if pol.BlockSize == 0 {
		pol.BlockSize = DefaultBlockSize
	} else if pol.BlockSize < 512 || pol.BlockSize > 65536 || pol.BlockSize&(pol.BlockSize-1) != 0 {
		fail(api.CodeBadRequest, "block size %d must be a power of two between 512 and 65536", pol.BlockSize)
		pol.BlockSize = DefaultBlockSize
	}

	// size
	switch {
	case req.SizeBytes <= 0:
		fail(api.CodeBadSize, "size must be positive (got %d)", req.SizeBytes)
	case req.SizeBytes > MaxVolumeSize:
		fail(api.CodeBadSize, "size %d exceeds the maximum %d", req.SizeBytes, int64(MaxVolumeSize))
	case req.SizeBytes%int64(pol.BlockSize) != 0:
		fail(api.CodeBadSize, "size %d is not a multiple of the block size %d", req.SizeBytes, pol.BlockSize)
	}

	// durability
	switch {
	case pol.Durability == "" && p.Name != "":
		pol.Durability = p.Durability
	case pol.Durability == "":
		pol.Durability = api.DurabilityBestEffort
	case !validDurability(pol.Durability):
		fail(api.CodeBadRequest, "unknown durability %s (best_effort, sync_all, sync_quorum)", api.QuoteName(pol.Durability))
	case p.Name != "" && pol.Durability != p.Durability:
		if p.Durability == api.DurabilitySyncAll {
			warn("durability_weakened", "durability %s overrides the %s preset's %s: acknowledged flushes may exist on fewer copies", pol.Durability, p.Name, p.Durability)
		} else {
			warn("preset_override", "durability %s overrides the %s preset's %s", pol.Durability, p.Name, p.Durability)
		}
	}

	// replication factor
	switch {
	case pol.RF < 0 || pol.RF > MaxRF:
		fail(api.CodeBadRequest, "rf %d out of range 1..%d", pol.RF, MaxRF)
	case pol.RF == 0 && p.Name != "":
		pol.RF = p.RF
	case pol.RF == 0:
		pol.RF = 2
		if servers < 2 {
			pol.RF = 1
			warn("rf_defaulted", "rf defaults to 1: only %d volume server(s) registered", servers)
		}
	case p.Name != "" && pol.RF != p.RF:
		warn("preset_override", "rf %d overrides the %s preset's %d", pol.RF, p.Name, p.RF)
	}
	if pol.RF >= 1 && pol.RF > servers {
		fail(api.CodeInsufficientServers, "rf %d needs %d distinct servers, %d registered", pol.RF, pol.RF, servers)
	}
	if pol.Durability == api.DurabilitySyncQuorum && pol.RF >= 1 && pol.RF < 3 {
		fail(api.CodeBadRequest, "sync_quorum needs rf >= 3 (got %d)", pol.RF)
	}
	if pol.Durability == api.DurabilitySyncAll && pol.RF == 1 {
		warn("single_copy", "sync_all with rf 1 keeps a single copy")
	}
	if pol.RF == 1 && p.Name != "" {
		warn("no_redundancy", "rf 1: the volume does not survive the loss of its server")
	}

	// WAL size
	switch {
	case pol.WALSizeBytes == 0 && p.Name != "":
		pol.WALSizeBytes = walSizeFor(p.WALSize, pol.SizeBytes, pol.BlockSize)
	case pol.WALSizeBytes == 0:
		pol.WALSizeBytes = walSizeFor(DefaultWALSize, pol.SizeBytes, pol.BlockSize)
	case pol.WALSizeBytes < MinWALSize:
		fail(api.CodeBadSize, "wal size %d below the minimum %d", pol.WALSizeBytes, int64(MinWALSize))
	case pol.WALSizeBytes > MaxWALSize:
		fail(api.CodeBadSize, "wal size %d exceeds the maximum %d", pol.WALSizeBytes, int64(MaxWALSize))
	case req.SizeBytes > 0 && pol.WALSizeBytes > max(req.SizeBytes, LargeWALSize):
		fail(api.CodeBadSize, "wal size %d is larger than the volume (%d bytes) and than %d: it could never fill", pol.WALSizeBytes, req.SizeBytes, int64(LargeWALSize))
	case pol.WALSizeBytes%int64(pol.BlockSize) != 0:
		fail(api.CodeBadSize, "wal size %d is not a multiple of the block size %d", pol.WALSizeBytes, pol.BlockSize)
	case p.Name != "" && pol.WALSizeBytes < walSizeFor(p.WALSize, pol.SizeBytes, pol.BlockSize):
		warn("wal_smaller_than_preset", "wal size %d is below the %s preset's %d: more flusher stalls under write bursts", pol.WALSizeBytes, p.Name, p.WALSize)
	}

	// min_copies: 0 = the preset's, else the default for rf and durability.
	switch {
	case req.MinCopies < 0:
		fail(api.CodeBadRequest, "min_copies %d must be at least 1 (0 = the default)", req.MinCopies)
	case req.MinCopies == 0 && p.MinCopies > 0:
		pol.MinCopies = min(p.MinCopies, max(pol.RF, 1))
	case req.MinCopies == 0:
		pol.MinCopies = DefaultMinCopies(pol.RF, pol.Durability)
	case pol.RF >= 1 && pol.RF <= MaxRF:
		pol.MinCopies = req.MinCopies
		if e := ValidateMinCopies(req.MinCopies, pol.RF); e != nil {
			out.Errors = append(out.Errors, *e)
		}
	}
	if pol.MinCopies > 1 && pol.Durability == api.DurabilityBestEffort {
		warn("min_copies_best_effort", "min_copies %d with best_effort: a flush still waits for %d durable copies", pol.MinCopies, pol.MinCopies)
	}
	out.Policy = pol
	return out
}

// walSizeFor is a default WAL size for a volume of size bytes: def, capped
// at twice the volume (a larger log buys nothing for a small volume; it is
// reserved on disk at create), rounded down to the block size, never below
// MinWALSize.
func walSizeFor(def, size int64, blockSize int) int64 {
	w := def
	if size > 0 && 2*size < w {
		w = 2 * size
	}
	if blockSize > 0 {
		w -= w % int64(blockSize)
	}
	return max(w, MinWALSize)
}
