package kernel

import "time"

// Event is something the keeper observed.
type Event int

const (
	EvLinkDead        Event = iota // the kernel reported a dead connection (or lost events)
	EvReconnectOK                  // new sockets were handed to the kernel
	EvReconnectFailed              // resolving, dialing, negotiating or RECONFIGURE failed
	EvTick                         // time passed
)

func (e Event) String() string {
	return [...]string{"link_dead", "reconnect_ok", "reconnect_failed", "tick"}[e]
}

// Action is what the keeper does next.
type Action int

const (
	ActWait      Action = iota // nothing to do until the next event
	ActReconnect               // find the primary, dial, negotiate, RECONFIGURE (after Delay)
	ActGiveUp                  // disconnect the device so I/O fails cleanly, and exit
)

func (a Action) String() string { return [...]string{"wait", "reconnect", "give_up"}[a] }

// Decision is an action and how long to wait before it.
type Decision struct {
	Action Action
	Delay  time.Duration
}

// Health is the keeper's view of the device's connections.
type Health struct {
	Down      bool      // at least one connection died and has not been replaced
	DownSince time.Time // when it went down
	Failures  int       // consecutive failed reconnect attempts
}

// Policy is the keeper's decision logic: a pure function of its inputs, so it
// is tested without a kernel.
type Policy struct {
	GiveUp     time.Duration // stop retrying this long after the connections died
	MinBackoff time.Duration // first retry delay after a failure
	MaxBackoff time.Duration // cap on the retry delay
}

// DefaultPolicy retries quickly at first, then every few seconds, for 5 minutes.
var DefaultPolicy = Policy{GiveUp: 5 * time.Minute, MinBackoff: 200 * time.Millisecond, MaxBackoff: 5 * time.Second}

// Step returns the new health and what to do, given an event at time now.
func (p Policy) Step(h Health, ev Event, now time.Time) (Health, Decision) {
	switch ev {
	case EvLinkDead:
		if !h.Down {
			h = Health{Down: true, DownSince: now}
		}
		// Reconnect at once; a burst of events (one per connection) costs
		// at most a spare round: the kernel ignores sockets it has no
		// dead slot for.
		return h, Decision{Action: ActReconnect}
	case EvReconnectOK:
		return Health{}, Decision{Action: ActWait}
	case EvReconnectFailed:
		if !h.Down {
			h = Health{Down: true, DownSince: now}
		}
		h.Failures++
		left := h.DownSince.Add(p.GiveUp).Sub(now)
		if left <= 0 {
			return h, Decision{Action: ActGiveUp}
		}
		d := p.backoff(h.Failures)
		if d > left {
			d = left // one last try right at the deadline
		}
		return h, Decision{Action: ActReconnect, Delay: d}
	case EvTick:
		if h.Down && !now.Before(h.DownSince.Add(p.GiveUp)) {
			return h, Decision{Action: ActGiveUp}
		}
	}
	return h, Decision{Action: ActWait}
}

func (p Policy) backoff(failures int) time.Duration {
	d := p.MinBackoff
	if d <= 0 {
		d = 100 * time.Millisecond
	}
	for i := 1; i < failures && d < p.MaxBackoff; i++ {
		d *= 2
	}
	if p.MaxBackoff > 0 && d > p.MaxBackoff {
		d = p.MaxBackoff
	}
	return d
}
