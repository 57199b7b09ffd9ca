package ublk

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"golang.org/x/sys/unix"
)

// START_USER_RECOVERY only for a quiesced (or FAIL_IO) device; LIVE
// waits; DEAD and unknown states are refused with an error naming them.
func TestRecoveryReady(t *testing.T) {
	for _, c := range []struct {
		state uint16
		ready bool
		fails bool
	}{
		{StateQuiesced, true, false},
		{StateFailIO, true, false},
		{StateLive, false, false},
		{StateDead, false, true},
		{7, false, true},
	} {
		ready, err := recoveryReady(c.state)
		if ready != c.ready || (err != nil) != c.fails {
			t.Errorf("state %s: ready %v err %v; want ready %v, error %v", stateName(c.state), ready, err, c.ready, c.fails)
		}
		if err != nil && !errors.Is(err, blockdev.ErrInvalid) {
			t.Errorf("state %s: %v does not wrap ErrInvalid", stateName(c.state), err)
		}
	}
	if _, err := recoveryReady(StateDead); err == nil || !contains(err.Error(), "DEAD") {
		t.Errorf("DEAD refusal does not name the state: %v", err)
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

// A queue loop's thread ends with its goroutine (goLocked), also when the
// goroutine first lands on the main thread, which Go never ends (forced
// here: the first check answers "main thread"), and waitThreadGone sees
// it; a thread that keeps running is reported after the bound instead of
// waited for forever.
func TestWaitThreadGone(t *testing.T) {
	for _, handOff := range []bool{false, true} {
		first := make(chan int, 1)
		if handOff {
			// The first thread asked plays the main thread from then on
			// (as does the real one): fn must run on neither.
			var mu sync.Mutex
			fake := 0
			onMainThread = func() bool {
				tid := unix.Gettid()
				mu.Lock()
				defer mu.Unlock()
				if fake == 0 {
					fake = tid
					first <- tid
				}
				return tid == fake || tid == unix.Getpid()
			}
		}
		tids := make(chan int)
		hold := make(chan struct{})
		goLocked(func() {
			tids <- unix.Gettid()
			<-hold
		})
		tid := <-tids
		onMainThread = func() bool { return unix.Gettid() == unix.Getpid() }
		if tid == unix.Getpid() {
			t.Fatal("goLocked ran fn on the main thread")
		}
		if handOff {
			if outer := <-first; outer == tid {
				t.Fatalf("hand-off ran fn on the thread it was to leave (%d)", tid)
			}
		}
		if err := waitThreadGone(tid, 20*time.Millisecond); err == nil {
			t.Fatal("a running thread was reported gone")
		}
		close(hold)
		if err := waitThreadGone(tid, 10*time.Second); err != nil {
			t.Fatalf("hand-off %v: thread of an ended goLocked goroutine: %v", handOff, err)
		}
	}
}
