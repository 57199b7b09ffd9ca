package kernel

import (
	"testing"
	"time"
)

func TestPolicy(t *testing.T) {
	p := Policy{GiveUp: 10 * time.Second, MinBackoff: 100 * time.Millisecond, MaxBackoff: 1 * time.Second}
	t0 := time.Unix(1000, 0)
	var h Health

	// Healthy ticks do nothing.
	h, d := p.Step(h, EvTick, t0)
	if d.Action != ActWait || h.Down {
		t.Fatalf("healthy tick: %+v %+v", h, d)
	}
	// A dead link: reconnect at once, remember when it went down.
	h, d = p.Step(h, EvLinkDead, t0)
	if d.Action != ActReconnect || d.Delay != 0 || !h.Down || !h.DownSince.Equal(t0) {
		t.Fatalf("link dead: %+v %+v", h, d)
	}
	// A second event (the other connection) keeps the original DownSince.
	h, _ = p.Step(h, EvLinkDead, t0.Add(time.Second))
	if !h.DownSince.Equal(t0) {
		t.Fatalf("second link dead moved DownSince: %+v", h)
	}
	// Failures back off exponentially up to the cap.
	var delays []time.Duration
	now := t0
	for i := 0; i < 6; i++ {
		now = now.Add(100 * time.Millisecond)
		h, d = p.Step(h, EvReconnectFailed, now)
		if d.Action != ActReconnect {
			t.Fatalf("failure %d: %+v", i, d)
		}
		delays = append(delays, d.Delay)
	}
	want := []time.Duration{100, 200, 400, 800, 1000, 1000}
	for i := range want {
		if delays[i] != want[i]*time.Millisecond {
			t.Fatalf("backoff %v, want %v ms", delays, want)
		}
	}
	// Success resets everything.
	h2, d := p.Step(h, EvReconnectOK, now)
	if d.Action != ActWait || h2.Down || h2.Failures != 0 {
		t.Fatalf("reconnect ok: %+v %+v", h2, d)
	}
	// Near the deadline the delay is clipped to it; past it we give up.
	h, d = p.Step(h, EvReconnectFailed, t0.Add(9900*time.Millisecond))
	if d.Action != ActReconnect || d.Delay != 100*time.Millisecond {
		t.Fatalf("clipped delay: %+v", d)
	}
	_, d = p.Step(h, EvReconnectFailed, t0.Add(10*time.Second))
	if d.Action != ActGiveUp {
		t.Fatalf("past give-up: %+v", d)
	}
	// A tick past the deadline while down gives up too (a reconnect attempt
	// that hangs must not keep the device forever).
	_, d = p.Step(h, EvTick, t0.Add(11*time.Second))
	if d.Action != ActGiveUp {
		t.Fatalf("tick past give-up: %+v", d)
	}
	// But not while healthy.
	_, d = p.Step(Health{}, EvTick, t0.Add(time.Hour))
	if d.Action != ActWait {
		t.Fatalf("healthy tick far later: %+v", d)
	}
	// A failure with no prior link-dead event (first attempt after lost
	// events) starts the clock.
	h, d = p.Step(Health{}, EvReconnectFailed, t0)
	if !h.Down || !h.DownSince.Equal(t0) || d.Action != ActReconnect {
		t.Fatalf("failure from healthy: %+v %+v", h, d)
	}
}
