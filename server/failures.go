package server

import (
	"errors"
	"sort"
	"sync"
	"time"

	"github.com/blockd/blockd/api"
)

// Retry pacing of an assigned volume this server could not create or
// open: the first retry after failRetryMin, doubling up to failRetryMax.
const (
	failRetryMin = time.Second
	failRetryMax = 30 * time.Second
	// maxReasonLen bounds a reason sent to the master and logged.
	maxReasonLen = 512
)

// volumeFailures remembers the assigned volumes this server cannot
// create or open (no space for the WAL, a WAL size the engine refuses,
// an unreadable superblock...). Each is reported in every heartbeat
// (api.HeartbeatRequest.Failures) so that the master can mark the volume
// failed, retried slowly, and logged once per distinct reason. The zero
// value is ready to use.
type volumeFailures struct {
	now func() time.Time // nil: time.Now

	mu sync.Mutex
	m  map[string]*volFailure
	// lastErr is the last assignment error logged per volume, so that an
	// assignment that keeps failing the same way is logged once.
	lastErr map[string]string
}

type volFailure struct {
	id      uint64
	reason  string
	next    time.Time
	backoff time.Duration
}

func (f *volumeFailures) clock() time.Time {
	if f.now != nil {
		return f.now()
	}
	return time.Now()
}

// errRetryLater: a create or open of the volume failed recently and the
// next attempt is not due yet (the failure is already reported).
var errRetryLater = errors.New("create or open failed recently; retry not due")

// createFailed marks an error of creating or opening an assigned volume:
// it is reported to the master and logged by volumeFailures, not by the
// generic assignment error path.
type createFailed struct{ err error }

func (e *createFailed) Error() string { return e.err.Error() }
func (e *createFailed) Unwrap() error { return e.err }

// due reports whether creating or opening volume (incarnation id) may be
// attempted now. A new incarnation is always due.
func (f *volumeFailures) due(volume string, id uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	x := f.m[volume]
	return x == nil || x.id != id || !f.clock().Before(x.next)
}

// failed records a failed create or open and schedules the next attempt.
// It reports whether the reason is new for this volume (the caller logs
// it then, and only then).
func (f *volumeFailures) failed(volume string, id uint64, reason string) (isNew bool, retryIn time.Duration) {
	if len(reason) > maxReasonLen {
		reason = reason[:maxReasonLen] + "..."
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.m == nil {
		f.m = map[string]*volFailure{}
	}
	x := f.m[volume]
	if x == nil || x.id != id {
		x = &volFailure{id: id}
		f.m[volume] = x
	}
	isNew = x.reason != reason
	x.reason = reason
	switch {
	case x.backoff == 0:
		x.backoff = failRetryMin
	case x.backoff < failRetryMax:
		x.backoff = min(2*x.backoff, failRetryMax)
	}
	x.next = f.clock().Add(x.backoff)
	return isNew, x.backoff
}

// clear forgets a volume's failure (it was created or opened, or dropped).
func (f *volumeFailures) clear(volume string) {
	f.mu.Lock()
	delete(f.m, volume)
	delete(f.lastErr, volume)
	f.mu.Unlock()
}

// keepOnly forgets the failures of volumes the master no longer assigns.
func (f *volumeFailures) keepOnly(assigned map[string]bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for v := range f.m {
		if !assigned[v] {
			delete(f.m, v)
		}
	}
	for v := range f.lastErr {
		if !assigned[v] {
			delete(f.lastErr, v)
		}
	}
}

// noteErr reports whether err is new for volume (to be logged); nil
// resets it.
func (f *volumeFailures) noteErr(volume string, err error) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.lastErr, volume)
		return false
	}
	if f.lastErr == nil {
		f.lastErr = map[string]string{}
	}
	msg := err.Error()
	if f.lastErr[volume] == msg {
		return false
	}
	f.lastErr[volume] = msg
	return true
}

// list is the heartbeat's Failures, sorted by volume.
func (f *volumeFailures) list() []api.VolumeFailure {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []api.VolumeFailure
	for v, x := range f.m {
		out = append(out, api.VolumeFailure{Volume: v, ID: x.id, Reason: x.reason})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Volume < out[j].Volume })
	return out
}
