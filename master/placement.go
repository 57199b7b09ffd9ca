package master

import (
	"fmt"
	"sort"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/blockd/blockd/api"
)

// Placement rejection reasons (stable strings).
const (
	RejectNotAlive             = "not_alive"
	RejectInsufficientCapacity = "insufficient_capacity"
	RejectInsufficientFree     = "insufficient_free_space" // the WAL (allocated up front) does not fit
)

// ServerState is what placement knows of one server.
type ServerState struct {
	ID            string
	Alive         bool
	CapacityBytes int64 // 0 = not reported
	FreeBytes     int64
	Volumes       int // volumes it holds (primary or replica)
	Primaries     int // volumes it is primary of
	// ProvisionedBytes is the size plus WAL of every volume it holds: what
	// it has promised, whether or not the sparse data files have filled.
	ProvisionedBytes int64
}

// DefaultOverprovisionPercent is the over-provisioning policy when none is
// configured: a server takes volumes whose sizes (plus WALs) add up to at
// most this percentage of its capacity. Volumes are sparse, so more than
// 100 is possible; the operator who sets it accepts that a full disk then
// fails writes instead of creates.
const DefaultOverprovisionPercent = 100

// Policy is the configurable part of placement.
type Policy struct {
	// OverprovisionPercent: provisioned bytes (sizes plus WALs) may reach
	// this percentage of a server's capacity (0 = DefaultOverprovisionPercent).
	OverprovisionPercent int
}

func (p Policy) overPct() int64 {
	if p.OverprovisionPercent <= 0 {
		return DefaultOverprovisionPercent
	}
	return int64(p.OverprovisionPercent)
}

func ib(n int64) string {
	if n < 0 {
		n = 0
	}
	return humanize.IBytes(uint64(n))
}

// Placement is the outcome of Place.
type Placement struct {
	Primary    string
	Replicas   []string
	Candidates []api.PlacementCandidate
	Err        *api.Error
}

// Place is PlaceWith under the default policy.
func Place(servers []ServerState, rf int, size, wal int64) Placement {
	return PlaceWith(Policy{}, servers, rf, size, wal)
}

// PlaceWith chooses rf distinct servers for a volume of size bytes with a WAL
// of wal bytes: alive servers that can hold it (size+wal within the
// over-provisioning allowance, the WAL, which is allocated up front,
// within the free bytes),
// fewest volumes first, then most free bytes, then ID; the primary is the
// chosen server with the fewest primaries. It is a pure function of its
// arguments: plan (dry run) and create share it.
func PlaceWith(pol Policy, servers []ServerState, rf int, size, wal int64) Placement {
	var out Placement
	sorted := append([]ServerState(nil), servers...)
	sort.Slice(sorted, func(i, j int) bool {
		a, b := sorted[i], sorted[j]
		if a.Volumes != b.Volumes {
			return a.Volumes < b.Volumes
		}
		if a.FreeBytes != b.FreeBytes {
			return a.FreeBytes > b.FreeBytes
		}
		return a.ID < b.ID
	})
	var chosen []ServerState
	var why []string
	for _, s := range sorted {
		c := api.PlacementCandidate{ServerID: s.ID, FreeBytes: s.FreeBytes, VolumeCount: s.Volumes}
		allowance := s.CapacityBytes/100*pol.overPct() + s.CapacityBytes%100*pol.overPct()/100 // exact, no overflow
		switch {
		case !s.Alive:
			c.Rejection = RejectNotAlive
			c.Reason = RejectNotAlive + ": no recent heartbeat"
		case s.CapacityBytes > 0 && s.ProvisionedBytes+size+wal > allowance:
			c.Rejection = RejectInsufficientCapacity
			c.Reason = fmt.Sprintf("%s: %s (size %s + WAL %s) > %s free to provision (capacity %s at %d%% over-provisioning, %s provisioned)",
				RejectInsufficientCapacity, ib(size+wal), ib(size), ib(wal), ib(allowance-s.ProvisionedBytes),
				ib(s.CapacityBytes), pol.overPct(), ib(s.ProvisionedBytes))
		case s.CapacityBytes > 0 && wal > s.FreeBytes:
			c.Rejection = RejectInsufficientFree
			c.Reason = fmt.Sprintf("%s: WAL %s (allocated up front) > %s free on disk", RejectInsufficientFree, ib(wal), ib(s.FreeBytes))
		case len(chosen) < rf:
			c.Selected = true
			chosen = append(chosen, s)
		}
		if c.Reason != "" {
			why = append(why, s.ID+": "+c.Reason)
		}
		out.Candidates = append(out.Candidates, c)
	}
	if rf < 1 || len(chosen) < rf {
		detail := ""
		if len(why) > 0 {
			detail = ": " + strings.Join(why, "; ")
		} else if len(servers) == 0 {
			detail = ": no server has registered"
		}
		out.Err = api.Errorf(api.CodeInsufficientServers, "rf %d needs %d eligible servers, %d available (of %d registered)%s", rf, rf, len(chosen), len(servers), detail)
		for i := range out.Candidates {
			out.Candidates[i].Selected = false
		}
		out.Err.Placement = out.Candidates
		return out
	}
	p := 0
	for i := range chosen {
		if chosen[i].Primaries < chosen[p].Primaries {
			p = i
		}
	}
	out.Primary = chosen[p].ID
	out.Replicas = []string{}
	for i, s := range chosen {
		if i != p {
			out.Replicas = append(out.Replicas, s.ID)
		}
	}
	return out
}
