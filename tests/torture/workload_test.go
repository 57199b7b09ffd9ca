package torture

import (
	"math/rand"
	"sync"
	"sync/atomic"
	"time"
)

// recorder collects the history; timestamps are monotonic nanoseconds
// since its start.
type recorder struct {
	start time.Time
	mu    sync.Mutex
	ops   []Op
	tag   atomic.Uint64
}

func newRecorder() *recorder { return &recorder{start: time.Now()} }

func (r *recorder) now() int64 { return int64(time.Since(r.start)) }

func (r *recorder) add(op Op) {
	r.mu.Lock()
	r.ops = append(r.ops, op)
	r.mu.Unlock()
}

func (r *recorder) history() []Op {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Op(nil), r.ops...)
}

// workload is the clients: each has one NBD connection to the current
// primary at a time, one request in flight, and records every request it
// sent with its outcome.
type workload struct {
	c       *cluster
	vol     string
	rec     *recorder
	blocks  int64
	timeout time.Duration
	stop    chan struct{}
	wg      sync.WaitGroup
	dials   atomic.Int64
}

func (w *workload) run(clients int, seed int64) {
	w.stop = make(chan struct{})
	for i := 0; i < clients; i++ {
		w.wg.Add(1)
		go w.client(i, rand.New(rand.NewSource(seed*1000+int64(i))))
	}
}

func (w *workload) halt() {
	close(w.stop)
	w.wg.Wait()
}

func (w *workload) stopped() bool {
	select {
	case <-w.stop:
		return true
	default:
		return false
	}
}

// connect dials the primary the master names now; it returns the
// server's ID too.
func (w *workload) connect() (*Client, string, error) {
	info, err := w.c.info(w.vol)
	if err != nil {
		return nil, "", err
	}
	w.dials.Add(1)
	cl, err := Dial(info.Primary.NBDAddr, w.vol, w.timeout)
	return cl, info.Primary.ServerID, err
}

func (w *workload) client(id int, rng *rand.Rand) {
	defer w.wg.Done()
	var cl *Client
	var server string
	defer func() {
		if cl != nil {
			cl.Close()
		}
	}()
	buf := make([]byte, 4*BlockSize)
	for !w.stopped() {
		if cl == nil {
			var err error
			if cl, server, err = w.connect(); err != nil {
				cl = nil
				time.Sleep(50 * time.Millisecond)
				continue
			}
		}
		op := Op{Client: id, Server: server}
		var err error
		switch p := rng.Intn(100); {
		case p < 10:
			op.Kind = KindFlush
			op.Call = w.rec.now()
			err = cl.Flush()
		case p < 55:
			op.Kind, op.Count = KindWrite, 1+rng.Intn(3)
			op.Block = rng.Int63n(w.blocks - int64(op.Count) + 1)
			for i := 0; i < op.Count; i++ {
				tag := w.rec.tag.Add(1)
				op.Tags = append(op.Tags, tag)
				Pattern(buf[i*BlockSize:(i+1)*BlockSize], tag, op.Block+int64(i))
			}
			op.Call = w.rec.now()
			err = cl.WriteAt(buf[:op.Count*BlockSize], op.Block*BlockSize)
		default:
			op.Kind, op.Count = KindRead, 1+rng.Intn(4)
			op.Block = rng.Int63n(w.blocks - int64(op.Count) + 1)
			op.Call = w.rec.now()
			err = cl.ReadAt(buf[:op.Count*BlockSize], op.Block*BlockSize)
			if err == nil {
				for i := 0; i < op.Count; i++ {
					op.Tags = append(op.Tags, Decode(buf[i*BlockSize:(i+1)*BlockSize], op.Block+int64(i)))
				}
			}
		}
		op.Return = w.rec.now()
		switch {
		case err == nil:
			op.Outcome = OK
		case IsServerError(err):
			op.Outcome, op.Note = Failed, err.Error()
		default:
			op.Outcome, op.Note = Unknown, err.Error()
		}
		if op.Kind == KindRead && op.Outcome != OK {
			op.Tags = nil
			op.Count = 0
		}
		w.rec.add(op)
		if err != nil {
			// A refused or broken request: ask the master again (the
			// primary may have changed).
			cl.Close()
			cl = nil
			time.Sleep(20 * time.Millisecond)
			continue
		}
		time.Sleep(time.Duration(5+rng.Intn(30)) * time.Millisecond)
	}
}

// finalRead flushes and reads every block through a fresh connection,
// recording the reads in the history; it returns each block's value.
func (w *workload) finalRead(client int) (map[int64]uint64, error) {
	var cl *Client
	var server string
	err := waitUntil(60*time.Second, func() error {
		var err error
		cl, server, err = w.connect()
		return err
	})
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	call := w.rec.now()
	err = cl.Flush()
	op := Op{Client: client, Kind: KindFlush, Call: call, Return: w.rec.now(), Outcome: OK, Server: server, Note: "final"}
	if err != nil {
		op.Outcome, op.Note = Unknown, "final: "+err.Error()
	}
	w.rec.add(op)
	final := map[int64]uint64{}
	buf := make([]byte, BlockSize)
	for b := int64(0); b < w.blocks; b++ {
		call := w.rec.now()
		if err := cl.ReadAt(buf, b*BlockSize); err != nil {
			return final, err
		}
		tag := Decode(buf, b)
		w.rec.add(Op{Client: client, Kind: KindRead, Block: b, Count: 1, Tags: []uint64{tag},
			Call: call, Return: w.rec.now(), Outcome: OK, Server: server, Note: "final"})
		final[b] = tag
	}
	return final, nil
}
