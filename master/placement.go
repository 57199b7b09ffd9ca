package master

import (
	"fmt"
	"sort"
	"strings"

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
}

// Placement is the outcome of Place.
type Placement struct {
	Primary    string
	Replicas   []string
	Candidates []api.PlacementCandidate
	Err        *api.Error
}

// Place chooses rf distinct servers for a volume of size bytes with a WAL
// of wal bytes: alive servers that can hold it (size+wal within the
// capacity, the WAL, which is allocated up front, within the free bytes),
// fewest volumes first, then most free bytes, then ID; the primary is the
// chosen server with the fewest primaries. It is a pure function of its
// arguments: plan (dry run) and create share it.
func Place(servers []ServerState, rf int, size, wal int64) Placement {
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
		switch {
		case !s.Alive:
			c.Rejection = RejectNotAlive
			why = append(why, s.ID+" not alive")
		case s.CapacityBytes > 0 && size+wal > s.CapacityBytes:
			c.Rejection = RejectInsufficientCapacity
			why = append(why, fmt.Sprintf("%s capacity %d < size %d + wal %d", s.ID, s.CapacityBytes, size, wal))
		case s.CapacityBytes > 0 && wal > s.FreeBytes:
			c.Rejection = RejectInsufficientFree
			why = append(why, fmt.Sprintf("%s free %d < wal %d", s.ID, s.FreeBytes, wal))
		case len(chosen) < rf:
			c.Selected = true
			chosen = append(chosen, s)
		}
		out.Candidates = append(out.Candidates, c)
	}
	if rf < 1 || len(chosen) < rf {
		detail := ""
		if len(why) > 0 {
			detail = ": " + strings.Join(why, "; ")
		}
		out.Err = api.Errorf(api.CodeInsufficientServers, "rf %d needs %d eligible servers, %d available (of %d registered)%s", rf, rf, len(chosen), len(servers), detail)
		for i := range out.Candidates {
			out.Candidates[i].Selected = false
		}
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
