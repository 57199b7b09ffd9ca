package replication

import (
	"bytes"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/blockvol"
)

// replServer is an in-process volume server's replication side: one
// listener, one Receiver, any number of replica volumes.
type replServer struct {
	t    *testing.T
	id   string
	addr string
	log  *slog.Logger
	mu   sync.Mutex
	vols map[string]ReplicaTarget
	recv *Receiver
	done chan struct{}
}

func startReplServer(t *testing.T, id string, log *slog.Logger) *replServer {
	s := &replServer{t: t, id: id, log: log, vols: map[string]ReplicaTarget{}}
	s.start("127.0.0.1:0")
	t.Cleanup(s.stop)
	return s
}

func (s *replServer) start(addr string) {
	var ln net.Listener
	var err error
	for i := 0; i < 200; i++ {
		ln, err = net.Listen("tcp", addr)
		if err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatalf("listen %s: %v", addr, err)
	}
	s.addr = ln.Addr().String()
	s.recv = NewReceiver(ReceiverConfig{ServerID: s.id, Lookup: s.lookup, Logger: s.log})
	s.done = make(chan struct{})
	go func() { s.recv.Serve(ln); close(s.done) }()
}

func (s *replServer) stop() {
	if s.recv != nil {
		s.recv.Close()
		<-s.done
		s.recv = nil
	}
}

func (s *replServer) restart() { s.stop(); s.start(s.addr) }

func (s *replServer) lookup(name string) (ReplicaTarget, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.vols[name]
	return t, ok
}

// testPrimaryID is the primary every replServer volume names (the
// ServerID of the tests' primaries).
const testPrimaryID = "srv-p"

func (s *replServer) set(name string, vol *blockvol.Volume, epoch uint64, dir string) {
	s.mu.Lock()
	s.vols[name] = ReplicaTarget{Vol: vol, Epoch: epoch, Dir: dir, PrimaryID: testPrimaryID}
	s.mu.Unlock()
}

func (s *replServer) setEpoch(name string, epoch uint64) {
	s.mu.Lock()
	t := s.vols[name]
	t.Epoch = epoch
	s.vols[name] = t
	s.mu.Unlock()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func replicaState(p *Primary, id string) (ReplicaStatus, bool) {
	for _, r := range p.Replicas() {
		if r.ServerID == id {
			return r, true
		}
	}
	return ReplicaStatus{}, false
}

func waitState(t *testing.T, p *Primary, id string, want ReplicaState) ReplicaStatus {
	t.Helper()
	var st ReplicaStatus
	waitFor(t, fmt.Sprintf("replica %s %v", id, want), func() bool {
		st, _ = replicaState(p, id)
		return st.State == want
	})
	return st
}

// sameData compares two volumes block for block.
func sameData(t *testing.T, a, b interface {
	ReadAt([]byte, int64) error
	Size() int64
}) {
	t.Helper()
	if a.Size() != b.Size() {
		t.Fatalf("sizes differ: %d vs %d", a.Size(), b.Size())
	}
	const bs = 4096
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < a.Size(); off += int64(len(ba)) {
		n := min(int64(len(ba)), a.Size()-off)
		if err := a.ReadAt(ba[:n], off); err != nil {
			t.Fatal(err)
		}
		if err := b.ReadAt(bb[:n], off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			for i := int64(0); i < n; i += bs {
				if !bytes.Equal(ba[i:i+bs], bb[i:i+bs]) {
					t.Fatalf("block at offset %d differs", off+i)
				}
			}
		}
	}
}

func pattern(lba int64, gen int) []byte {
	b := make([]byte, 4096)
	for i := range b {
		b[i] = byte(int(lba)*7 + gen*13 + i/512)
	}
	copy(b, fmt.Sprintf("lba=%d gen=%d", lba, gen))
	return b
}

func mustListen(t testing.TB) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}
