package torture

import (
	"fmt"
	"math/rand"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// leaderKill is one kill -9 of the master leader the schedule caused.
type leaderKill struct {
	fault      fault
	killed     string // the killed leader's API address
	elected    string // the next leader's
	killAt     int64  // recorder time of the kill
	electedAt  int64  // recorder time a new leader answered
	epochMoved bool   // the volume changed primary meanwhile (kill_leader only: it should not)
	flushGap   time.Duration
	writeGap   time.Duration
}

// killLeader kills -9 the master leader and returns the record and the
// killed master's index (restart it with c.masters[i].start); waitElected
// then waits until another master leads.
func killLeader(t *testing.T, c *cluster, rec *recorder, f fault) (leaderKill, int, error) {
	li, err := c.leader(-1)
	if err != nil {
		return leaderKill{}, -1, err
	}
	lk := leaderKill{fault: f, killed: c.mAPIs[li], killAt: rec.now()}
	c.masters[li].kill9()
	t.Logf("%s: killed master leader %s", f, lk.killed)
	return lk, li, nil
}

func (lk *leaderKill) waitElected(c *cluster, rec *recorder, li int) error {
	var ni int
	err := waitUntil(60*time.Second, func() error {
		var err error
		ni, err = c.leader(li)
		return err
	})
	if err != nil {
		return fmt.Errorf("no new master leader after killing %s: %w", lk.killed, err)
	}
	lk.elected, lk.electedAt = c.mAPIs[ni], rec.now()
	return nil
}

// measureLeaderKill: the longest time around a leader kill that no
// flush (write) succeeded, until the first success invoked after the new
// leader answered (the primary's lease is renewed by the new leader).
func measureLeaderKill(lk *leaderKill, h []Op) {
	lk.flushGap = longestGap(h, KindFlush, lk.killAt, lk.electedAt)
	lk.writeGap = longestGap(h, KindWrite, lk.killAt, lk.electedAt)
}

// reconnectStorm: while the workload writes, n extra clients open and
// close NBD connections to the primary in a tight loop for d: close right
// after the handshake (with or without a disconnect request), one read or
// one write then close, a read left in flight when the connection is
// dropped, a TCP connection dropped in the middle of the handshake. The
// reads and writes that got an answer go into the history (a request
// whose connection was dropped constrains nothing: only reads are left in
// flight). It returns the number of connections opened.
func reconnectStorm(c *cluster, vol string, w *workload, rng *rand.Rand, n int, d time.Duration, firstClient int) int64 {
	var opened atomic.Int64
	var wg sync.WaitGroup
	stop := time.Now().Add(d)
	for k := 0; k < n; k++ {
		r := rand.New(rand.NewSource(rng.Int63()))
		id := firstClient + k
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, BlockSize)
			for time.Now().Before(stop) {
				info, err := c.info(vol)
				if err != nil || info.Primary.NBDAddr == "" {
					time.Sleep(20 * time.Millisecond)
					continue
				}
				addr, server := info.Primary.NBDAddr, info.Primary.ServerID
				for i := 0; i < 20 && time.Now().Before(stop); i++ {
					opened.Add(1)
					if r.Intn(6) == 0 {
						// Half a handshake: read some of the greeting, hang up.
						if nc, err := net.DialTimeout("tcp", addr, 2*time.Second); err == nil {
							_ = nc.SetDeadline(time.Now().Add(time.Second))
							_, _ = nc.Read(make([]byte, 1+r.Intn(17)))
							nc.Close()
						}
						continue
					}
					cl, err := Dial(addr, vol, 5*time.Second)
					if err != nil {
						break // the primary moved or is down: ask again
					}
					switch r.Intn(5) {
					case 0:
						cl.Close()
					case 1:
						_ = cl.Abort()
					case 2:
						_ = cl.SendRead(BlockSize, r.Int63n(w.blocks)*BlockSize)
						_ = cl.Abort()
					case 3:
						op := Op{Client: id, Server: server, Kind: KindRead, Count: 1, Block: r.Int63n(w.blocks), Note: "storm"}
						op.Call = w.rec.now()
						err := cl.ReadAt(buf, op.Block*BlockSize)
						op.Return = w.rec.now()
						if err == nil {
							op.Tags = []uint64{Decode(buf, op.Block)}
							w.rec.add(op)
						}
						_ = cl.Abort()
					default:
						op := Op{Client: id, Server: server, Kind: KindWrite, Count: 1, Block: r.Int63n(w.blocks), Note: "storm"}
						tag := w.rec.tag.Add(1)
						op.Tags = []uint64{tag}
						Pattern(buf, tag, op.Block)
						op.Call = w.rec.now()
						err := cl.WriteAt(buf, op.Block*BlockSize)
						op.Return = w.rec.now()
						switch {
						case err == nil:
							op.Outcome = OK
						case IsServerError(err):
							op.Outcome = Failed
						default:
							op.Outcome = Unknown
						}
						w.rec.add(op)
						if r.Intn(2) == 0 {
							cl.Close()
						} else {
							_ = cl.Abort()
						}
					}
				}
			}
		}()
	}
	wg.Wait()
	return opened.Load()
}
