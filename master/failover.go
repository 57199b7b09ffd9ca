package master

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/blockd/blockd/api"
)

// CandidateInput is everything the master knows about one replica of a
// volume when it considers promoting it.
type CandidateInput struct {
	ServerID   string
	Registered bool                 // in the raft server registry
	Heard      bool                 // a heartbeat arrived since this leader took over
	Age        time.Duration        // time since that heartbeat
	Report     *api.HeartbeatVolume // the server's own report of the volume (nil: not reported)
	// PrimaryView is the primary's last report about this replica, taken
	// only from a report at the volume's current epoch (nil: none).
	PrimaryView *api.HeartbeatReplica
	// InActing: a member of the acting set. A replica outside it is stale
	// (it may lack acknowledged writes): reason "stale", soft.
	InActing bool
}

// Gates are the thresholds of candidate evaluation.
type Gates struct {
	FreshWindow time.Duration // a heartbeat older than this is stale
	MaxLag      uint64        // max (primary head LSN - candidate flushed LSN); 0 = unlimited
}

var hardReasons = map[string]bool{
	api.ReasonNotAReplica: true, api.ReasonIsPrimary: true, api.ReasonServerUnknown: true,
	api.ReasonNoHeartbeat: true, api.ReasonHeartbeatStale: true, api.ReasonVolumeNotReported: true,
	api.ReasonWrongRole: true, api.ReasonNeedsRebuild: true, api.ReasonVolumeIDMismatch: true,
}

// IsHard reports whether a rejection reason cannot be bypassed by force.
func IsHard(reason string) bool { return hardReasons[reason] }

// EvaluateCandidates applies the promotion gates to every replica of a
// volume (id, epoch; primaryHead is the primary's last reported head LSN, 0
// if unknown) and returns them with their reasons, plus the candidate
// automatic failover would choose: among those with no reason at all, the
// highest proven FlushedLSN (the replica's own durable LSN), ties by ID.
// Pure: no clocks, no I/O.
func EvaluateCandidates(id, epoch, primaryHead uint64, in []CandidateInput, g Gates) ([]api.Candidate, string) {
	out := make([]api.Candidate, 0, len(in))
	for _, c := range in {
		cand := api.Candidate{ServerID: c.ServerID, Reasons: []string{}}
		add := func(r string) { cand.Reasons = append(cand.Reasons, r) }
		if !c.InActing {
			add(api.ReasonStale)
		}
		if c.PrimaryView != nil {
			cand.State = c.PrimaryView.State
		}
		switch {
		case !c.Registered:
			add(api.ReasonServerUnknown)
		case !c.Heard:
			add(api.ReasonNoHeartbeat)
		case c.Age > g.FreshWindow:
			add(api.ReasonHeartbeatStale)
		}
		if c.Heard && c.Report == nil {
			add(api.ReasonVolumeNotReported)
		}
		if r := c.Report; r != nil {
			cand.Role, cand.Epoch, cand.FlushedLSN = r.Role, r.Epoch, r.DurableLSN
			if r.ID != 0 && r.ID != id {
				add(api.ReasonVolumeIDMismatch)
			}
			switch r.Role {
			case api.RoleReplica:
			case api.RoleRebuilding:
				add(api.ReasonNeedsRebuild)
			default:
				add(api.ReasonWrongRole)
			}
			if r.Epoch < epoch {
				add(api.ReasonStaleEpoch)
			} else if r.Epoch > epoch {
				add(api.ReasonWrongRole) // ahead of the registry: not a replica of this epoch
			}
			if primaryHead > 0 && g.MaxLag > 0 && primaryHead > r.DurableLSN && primaryHead-r.DurableLSN > g.MaxLag {
				add(api.ReasonLagExceeded)
			}
		}
		if v := c.PrimaryView; v != nil {
			switch v.State {
			case api.StateInSync:
			case api.StateNeedsRebuild, api.StateRebuilding:
				add(api.ReasonNeedsRebuild)
			default:
				add(api.ReasonNotInSync)
			}
		}
		cand.Reasons = dedup(cand.Reasons)
		cand.Eligible = len(cand.Reasons) == 0
		cand.Forceable = true
		for _, r := range cand.Reasons {
			if IsHard(r) {
				cand.Forceable = false
			}
		}
		out = append(out, cand)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].FlushedLSN != out[j].FlushedLSN {
			return out[i].FlushedLSN > out[j].FlushedLSN
		}
		return out[i].ServerID < out[j].ServerID
	})
	best := ""
	for _, c := range out {
		if c.Eligible {
			best = c.ServerID
			break
		}
	}
	return out, best
}

func dedup(in []string) []string {
	seen := map[string]bool{}
	out := in[:0]
	for _, s := range in {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// PromoteDecision applies the manual-promote rules to evaluated candidates.
// target "" means the best candidate (with force: the forceable one with the
// highest FlushedLSN when none is eligible). Hard reasons reject even with
// force; soft ones (including primary_alive and lower_flushed_lsn) reject
// unless force, and are returned as bypassed. primary is the current primary.
func PromoteDecision(cands []api.Candidate, best, primary, target string, force, primaryAlive bool) (string, []string, *api.Error) {
	reject := func(f string, a ...any) (string, []string, *api.Error) {
		e := api.Errorf(api.CodePromoteRejected, f, a...)
		e.Candidates = cands
		return "", nil, e
	}
	var chosen *api.Candidate
	if target == "" {
		for i := range cands {
			if cands[i].ServerID == best || (best == "" && force && cands[i].Forceable) {
				chosen = &cands[i]
				break
			}
		}
		if chosen == nil {
			if len(cands) == 0 {
				return reject("the volume has no replicas")
			}
			return reject("no eligible candidate: %s", summarize(cands))
		}
	} else {
		if target == primary {
			return reject("%s: %s", target, api.ReasonIsPrimary)
		}
		for i := range cands {
			if cands[i].ServerID == target {
				chosen = &cands[i]
			}
		}
		if chosen == nil {
			return reject("%s: %s", target, api.ReasonNotAReplica)
		}
	}
	reasons := append([]string(nil), chosen.Reasons...)
	if best != "" && chosen.ServerID != best {
		for _, c := range cands {
			if c.ServerID == best && c.FlushedLSN > chosen.FlushedLSN {
				reasons = append(reasons, api.ReasonLowerFlushedLSN)
			}
		}
	}
	if primaryAlive {
		reasons = append(reasons, api.ReasonPrimaryAlive)
	}
	var hard, soft []string
	for _, r := range reasons {
		if IsHard(r) {
			hard = append(hard, r)
		} else {
			soft = append(soft, r)
		}
	}
	if len(hard) > 0 {
		return reject("%s: %s (cannot be forced)", chosen.ServerID, strings.Join(hard, ","))
	}
	if len(soft) > 0 && !force {
		return reject("%s: %s (use --force to override)", chosen.ServerID, strings.Join(soft, ","))
	}
	return chosen.ServerID, soft, nil
}

func summarize(cands []api.Candidate) string {
	var parts []string
	for _, c := range cands {
		parts = append(parts, fmt.Sprintf("%s[%s]", c.ServerID, strings.Join(c.Reasons, ",")))
	}
	return strings.Join(parts, " ")
}

// FailoverActing is the acting set after promoting newPrimary: the old
// set minus the new primary. The old primary is not in it: it returns as
// a stale replica and is added back once InSync.
func FailoverActing(acting []string, newPrimary string) []string {
	out := []string{}
	for _, a := range acting {
		if a != newPrimary {
			out = append(out, a)
		}
	}
	return out
}

// FailoverReplicas is the replica set after promoting newPrimary: the old
// replicas minus the new primary, plus the old primary (it rejoins as a
// replica when it returns and is recovered by catch-up/resync/rebuild).
func FailoverReplicas(oldPrimary string, replicas []string, newPrimary string) []string {
	out := []string{}
	for _, r := range replicas {
		if r != newPrimary && r != oldPrimary {
			out = append(out, r)
		}
	}
	if oldPrimary != "" && oldPrimary != newPrimary {
		out = append(out, oldPrimary)
	}
	return out
}
