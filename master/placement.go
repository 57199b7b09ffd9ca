package master

import (
	"sort"

	"github.com/blockd/blockd/api"
)

// Placement rejection reasons (stable strings).
const (
	RejectNotAlive             = "not_alive"
	RejectInsufficientCapacity = "insufficient_capacity"
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

// Place chooses rf distinct servers for a volume of size bytes: alive
// servers that can hold it, fewest volumes first, then most free bytes, then
// ID; the primary is the chosen server with the fewest primaries. It is a
// pure function of its arguments: plan (dry run) and create share it.
func Place(servers []ServerState, rf int, size int64) Placement {
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
	for _, s := range sorted {
		c := api.PlacementCandidate{ServerID: s.ID, FreeBytes: s.FreeBytes, VolumeCount: s.Volumes}
		switch {
		case !s.Alive:
			c.Rejection = RejectNotAlive
		case s.CapacityBytes > 0 && size > s.CapacityBytes:
			c.Rejection = RejectInsufficientCapacity
		case len(chosen) < rf:
			c.Selected = true
			chosen = append(chosen, s)
		}
		out.Candidates = append(out.Candidates, c)
	}
	if rf < 1 || len(chosen) < rf {
		out.Err = api.Errorf(api.CodeInsufficientServers, "rf %d needs %d eligible servers, %d available (of %d registered)", rf, rf, len(chosen), len(servers))
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
