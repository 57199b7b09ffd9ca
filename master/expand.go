package master

import (
	"fmt"
	"time"

	"github.com/blockd/blockd/api"
)

// ExpandAction is what the leader does with a preparing expand.
type ExpandAction int

const (
	ExpandWait ExpandAction = iota
	ExpandCommit
	ExpandCancel
)

func (a ExpandAction) String() string { return [...]string{"wait", "commit", "cancel"}[a] }

// Stable causes of a cancel (ExpandDecision.Cause).
const (
	ExpandCausePrepareFailed = "prepare_failed" // the member reported an error preparing
	ExpandCauseSilent        = "no_heartbeat"   // the member stopped heartbeating
	ExpandCauseTimeout       = "timeout"        // the member heartbeats but did not prepare in time
)

// ExpandMember is what the leader knows of one member of an expand.
type ExpandMember struct {
	ServerID string
	// SilentFor is how long since the leader last heard the member (or,
	// never heard since the leader started, since the leader started).
	SilentFor time.Duration
	// Report is the member's last report of the volume (nil: none).
	Report *api.HeartbeatVolume
}

// ExpandPolicy bounds an expand.
type ExpandPolicy struct {
	// Timeout: a member that has not prepared this long after the intent
	// cancels it.
	Timeout time.Duration
	// SilentLimit: a member silent this long cancels it at once (it may
	// be dead; waiting for the timeout would only delay the answer).
	SilentLimit time.Duration
}

// ExpandDecision is DecideExpand's answer.
type ExpandDecision struct {
	Action   ExpandAction
	Server   string // cancel: the member that caused it
	Cause    string // cancel: ExpandCause*
	Reason   string // cancel: one line, names the member and why
	Prepared []string
	Waiting  []string
}

// preparedFor reports whether r says its server prepared expand e. A
// report of another expand (an older one that was cancelled, or of
// another incarnation of the volume) is stale and says nothing.
func preparedFor(e *ExpandRecord, volID uint64, r *api.HeartbeatVolume) bool {
	return r != nil && (r.ID == 0 || r.ID == volID) && r.ExpandID == e.ID && r.PendingSizeBytes == e.SizeBytes && r.ExpandError == ""
}

// DecideExpand decides a preparing expand from the members' reports: every
// member prepared -> commit; a member failed to prepare, went silent, or
// has not prepared within the timeout -> cancel, naming it; otherwise
// wait. Pure: a function of its arguments.
func DecideExpand(e *ExpandRecord, volID uint64, members []ExpandMember, now time.Time, p ExpandPolicy) ExpandDecision {
	var d ExpandDecision
	cancel := func(server, cause, reason string) ExpandDecision {
		d.Action, d.Server, d.Cause, d.Reason = ExpandCancel, server, cause, reason
		return d
	}
	byID := map[string]ExpandMember{}
	for _, m := range members {
		byID[m.ServerID] = m
	}
	for _, id := range e.Members {
		m, ok := byID[id]
		r := m.Report
		if r != nil && r.ID != 0 && r.ID != volID {
			r = nil // another incarnation's report
		}
		switch {
		case preparedFor(e, volID, r):
			d.Prepared = append(d.Prepared, id)
			continue
		case r != nil && r.ExpandID == e.ID && r.ExpandError != "":
			return cancel(id, ExpandCausePrepareFailed, fmt.Sprintf("server %s failed to prepare %d bytes: %s", id, e.SizeBytes, r.ExpandError))
		case ok && m.SilentFor > p.SilentLimit:
			return cancel(id, ExpandCauseSilent, fmt.Sprintf("server %s has not heartbeated for %v", id, m.SilentFor.Round(time.Millisecond)))
		}
		d.Waiting = append(d.Waiting, id)
	}
	if len(d.Waiting) == 0 {
		d.Action = ExpandCommit
		return d
	}
	if age := now.Sub(time.UnixMilli(e.StartedUnixMS)); age > p.Timeout {
		id := d.Waiting[0]
		what := "no report of the volume"
		if r := byID[id].Report; r != nil {
			what = fmt.Sprintf("it reports size %d, pending %d for expand %d", r.SizeBytes, r.PendingSizeBytes, r.ExpandID)
		}
		return cancel(id, ExpandCauseTimeout, fmt.Sprintf("server %s did not prepare %d bytes within %v (%s)", id, e.SizeBytes, p.Timeout, what))
	}
	return d
}
