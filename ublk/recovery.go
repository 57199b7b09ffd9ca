package ublk

// Taking a device over from a server that exited (user recovery), and
// letting go of one so that the next server can (Release's queue threads
// and rings).

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"time"

	"github.com/blockd/blockd/blockdev"
	"golang.org/x/sys/unix"
)

// Recover takes over device id, whose previous server exited, with user
// recovery: START_USER_RECOVERY once the driver reports the device
// quiesced (waiting, bounded, while the old process is still going away),
// fresh queue loops, END_USER_RECOVERY. /dev/ublkbN and any
// filesystem mounted on it stay in place; requests queued meanwhile (and,
// in RecoveryReissue mode, those the old server had accepted) are served
// by this process. dev must hold the same data the old server served.
func Recover(ctx context.Context, id int, dev blockdev.Device, o Options) (*Device, error) {
	if err := o.fill(); err != nil {
		return nil, err
	}
	if ctx == nil {
		ctx = context.Background()
	}
	ctl, err := openControl()
	if err != nil {
		return nil, err
	}
	return recoverDev(ctx, ctl, uint32(id), dev, o)
}

func recoverDev(ctx context.Context, ctl *control, id uint32, dev blockdev.Device, o Options) (*Device, error) {
	info, err := ctl.getDevInfo(id)
	if err != nil {
		ctl.close()
		return nil, err
	}
	if info.Flags&FeatUserRecovery == 0 {
		ctl.close()
		return nil, fmt.Errorf("ublk: device %d was created without user recovery (flags %#x): %w", id, info.Flags, blockdev.ErrInvalid)
	}
	log := o.Logger
	log.Info("ublk_recovery_start", "dev", id, "state", stateName(info.State), "old_pid", info.ServerPID,
		"reissue", info.Flags&FeatUserRecoveryReiss != 0)
	if ctx == nil {
		ctx = context.Background()
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
	}
	// START_USER_RECOVERY is sent only once GET_DEV_INFO reports the
	// device quiesced (recoveryReady); the driver still answers EBUSY (or
	// EINVAL while the queues are being torn down) until the old server
	// has released /dev/ublkcN.
	t0 := time.Now()
	for attempt := 0; ; attempt++ {
		ready, rerr := recoveryReady(info.State)
		if rerr != nil {
			ctl.close()
			return nil, fmt.Errorf("ublk: recover device %d: %w", id, rerr)
		}
		err = nil
		if ready {
			err = ctl.simple("START_USER_RECOVERY", cmdStartUserRecovery, id, 0)
			if err == nil {
				break
			}
			if !errors.Is(err, ErrBusy) && !errors.Is(err, unix.EINVAL) {
				ctl.close()
				return nil, err
			}
		}
		select {
		case <-ctx.Done():
			ctl.close()
			if !ready {
				return nil, fmt.Errorf("ublk: recover device %d: still %s after %v, not quiesced (old server pid %d; the driver quiesces a device once every request handed to the old server is requeued): %w: %w",
					id, stateName(info.State), time.Since(t0).Round(time.Millisecond), info.ServerPID, ErrBusy, ctx.Err())
			}
			return nil, fmt.Errorf("ublk: device %d still held by pid %d: %w (last: %w)", id, info.ServerPID, ctx.Err(), err)
		case <-time.After(min(time.Duration(attempt+1)*20*time.Millisecond, 500*time.Millisecond)):
		}
		if attempt%25 == 24 {
			log.Info("ublk_recovery_waiting", "dev", id, "state", stateName(info.State), "err", err)
		}
		if info, err = ctl.getDevInfo(id); err != nil {
			ctl.close()
			return nil, err
		}
	}
	d := &Device{info: info, ctl: ctl, dev: dev, charFd: -1, log: log, done: make(chan struct{}), inline: o.Inline}
	if err := d.openChar(ctx); err != nil {
		d.closeCtl()
		return nil, err
	}
	if err := d.startQueues(); err != nil {
		d.abandon()
		d.closeCtl()
		return nil, err
	}
	if err := ctl.simple("END_USER_RECOVERY", cmdEndUserRecovery, id, uint64(os.Getpid())); err != nil {
		d.abandon()
		d.closeCtl()
		return nil, err
	}
	go d.watch()
	log.Info("ublk_recovery_done", "dev", id, "path", d.Path(), "queues", info.NrHWQueues, "depth", info.QueueDepth)
	return d, nil
}

// recoveryReady decides from the device state GET_DEV_INFO reports
// whether START_USER_RECOVERY may be sent now. The driver (Linux 6.12)
// runs START_USER_RECOVERY under the device's mutex, and the work that
// quiesces a device whose server died holds that mutex until every
// request handed to the old server has been requeued: sent while the
// device is still LIVE, the command blocks in the kernel for as long as
// that takes, forever if the device never quiesces. QUIESCED (and FAIL_IO,
// on kernels with UBLK_F_USER_RECOVERY_FAIL_IO) may be recovered; LIVE
// means wait; DEAD (stopped) can only be deleted.
func recoveryReady(state uint16) (bool, error) {
	switch state {
	case StateQuiesced, StateFailIO:
		return true, nil
	case StateLive:
		return false, nil
	case StateDead:
		return false, fmt.Errorf("device is stopped (state DEAD), it cannot be recovered; delete it (blockd detach) and attach again: %w", blockdev.ErrInvalid)
	}
	return false, fmt.Errorf("device in unknown state %d: %w", state, blockdev.ErrInvalid)
}

func stateName(state uint16) string {
	switch state {
	case StateDead:
		return "DEAD"
	case StateLive:
		return "LIVE"
	case StateQuiesced:
		return "QUIESCED"
	case StateFailIO:
		return "FAIL_IO"
	}
	return "state(" + strconv.Itoa(int(state)) + ")"
}

// threadExitWait bounds how long closeKeptRings waits for a queue's
// thread to be gone.
const threadExitWait = 5 * time.Second

// closeKeptRings closes the rings of the queue loops this process stopped
// (Release, abandon) once their threads are gone.
//
// A loop does not close its own ring: that would cancel the ring's
// commands from a kernel worker while the task that owns them is still
// alive. The 6.12 driver aborts the queue's requests once, at the first
// cancellation; a request whose delivery was already queued to the task
// is then still handed to that live task afterwards, and nothing ever
// requeues it: the work that quiesces the device waits for it forever
// while holding the device's mutex, GET_DEV_INFO keeps reporting LIVE and
// the next server's START_USER_RECOVERY blocks in the kernel. Closed after
// the thread has ended (it ends with its locked goroutine), the ring's
// cancellation finds the task exiting or gone, and every delivery still
// pending requeues its request instead, as when a server is killed.
func (d *Device) closeKeptRings() {
	d.ringMu.Lock()
	defer d.ringMu.Unlock()
	for _, q := range d.queues {
		if q.kept == nil {
			continue
		}
		<-q.exited
		if err := waitThreadGone(q.tid, threadExitWait); err != nil {
			d.log.Warn("ublk_queue_thread_lingers", "dev", d.info.DevID, "queue", q.id, "err", err,
				"reason", "ring closed anyway; the next server's recovery may have to wait for the driver")
		}
		q.kept.Close()
		q.kept = nil
	}
}

// goLocked runs fn on a new goroutine locked to an OS thread that is not
// the process's main thread, and never unlocked: the thread ends when fn
// returns. (Go cannot end the main thread: a locked goroutine that ends
// there leaves the thread alive, so a queue's task would live on.)
func goLocked(fn func()) { go runLocked(fn, nil) }

// runLocked is goLocked's goroutine: it locks its thread (then tells its
// parent, which may let go of its own) and runs fn there, unless that is
// the main thread; then it holds the main thread while a new goroutine,
// which cannot get it, finds another.
func runLocked(fn func(), locked chan<- struct{}) {
	runtime.LockOSThread()
	if locked != nil {
		close(locked)
	}
	if !onMainThread() {
		fn()
		return
	}
	next := make(chan struct{})
	go runLocked(fn, next)
	<-next
	runtime.UnlockOSThread()
}

// onMainThread reports whether the calling (locked) goroutine runs on the
// process's main thread; a variable so that a test can force goLocked's
// hand-off.
var onMainThread = func() bool { return unix.Gettid() == unix.Getpid() }

// waitThreadGone waits until thread tid of this process has ended.
func waitThreadGone(tid int, bound time.Duration) error {
	path := "/proc/self/task/" + strconv.Itoa(tid)
	deadline := time.Now().Add(bound)
	for {
		_, err := os.Stat(path)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("thread %d: %w", tid, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("thread %d still running after %v", tid, bound)
		}
		time.Sleep(time.Millisecond)
	}
}
