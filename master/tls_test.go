package master

import (
	"bytes"
	"crypto/tls"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
)

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func loadTest(t *testing.T, dir, kind, name, prefix string) *tlsauth.Creds {
	t.Helper()
	d := filepath.Join(dir, kind, name)
	c, err := tlsauth.Load(filepath.Join(d, prefix+"-cert.pem"), filepath.Join(d, prefix+"-key.pem"), filepath.Join(d, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestRaftOverTLS: three masters elect a leader over the TLS stream
// layer; a server's certificate at a raft port is
// refused; a client's request reaches the leader through a follower's
// redirect over https; a client may not join the raft cluster.
func TestRaftOverTLS(t *testing.T) {
	dir := t.TempDir()
	if _, err := tlsauth.Init(dir, tlsauth.InitOptions{Masters: []string{"m1", "m2", "m3", "m4"}, Servers: []string{"s1"}, Clients: []string{"alice"}}); err != nil {
		t.Fatal(err)
	}
	var apis, rafts, peers []string
	for i := 0; i < 3; i++ {
		apis, rafts = append(apis, freePort(t)), append(rafts, freePort(t))
		peers = append(peers, apis[i]+"="+rafts[i])
	}
	var ms []*Master
	logs := make([]*lockedBuf, 3)
	for i, name := range []string{"m1", "m2", "m3"} {
		logs[i] = &lockedBuf{}
		ms = append(ms, startMaster(t, Config{DataDir: t.TempDir(), APIAddr: apis[i], RaftAddr: rafts[i], Peers: peers,
			TLS: loadTest(t, dir, "masters", name, "server"), Logger: slog.New(slog.NewTextHandler(logs[i], nil))}))
	}
	waitFor(t, "a leader over TLS raft", 60*time.Second, func() bool { return ms[0].IsLeader() || ms[1].IsLeader() || ms[2].IsLeader() })
	follower := 0
	for i, m := range ms {
		if !m.IsLeader() {
			follower = i
		}
	}
	alice := loadTest(t, dir, "clients", "alice", "client")
	// Through a follower: the 307 says http://, the client stays on https.
	cl := api.NewClientTLS([]string{apis[follower]}, alice.ClientConfig(tlsauth.Expect(tlsauth.KindMaster, "")))
	if _, err := cl.ListVolumes(ctxT(t)); err != nil {
		t.Fatalf("list through a follower over TLS: %v", err)
	}

	// A server certificate at a raft port.
	s1 := loadTest(t, dir, "servers", "s1", "server")
	c, err := tls.Dial("tcp", rafts[follower], s1.ClientConfig(nil))
	if err == nil {
		_, err = c.Write([]byte{0})
		if err == nil {
			_, err = c.Read(make([]byte, 1))
		}
		c.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "bad certificate") {
		t.Fatalf("server certificate at the raft port: %v", err)
	}
	t.Logf("server certificate at raft port: %v", err)

	// A client may not join.
	_, err = cl.JoinMaster(ctxT(t), api.JoinRequest{ID: "127.0.0.1:1", RaftAddr: "127.0.0.1:2"})
	if !api.IsCode(err, api.CodeForbidden) {
		t.Fatalf("join with a client certificate: %v", err)
	}
	t.Logf("client join: %v", err)

	// A fourth master joins over TLS (status probe, join call, raft).
	var leader *Master
	for _, m := range ms {
		if m.IsLeader() {
			leader = m
		}
	}
	startMaster(t, Config{DataDir: t.TempDir(), APIAddr: freePort(t), RaftAddr: freePort(t), Join: apis[follower],
		TLS: loadTest(t, dir, "masters", "m4", "server"), Logger: slog.New(slog.NewTextHandler(&lockedBuf{}, nil))})
	waitFor(t, "the fourth master a voter over TLS", 60*time.Second, func() bool {
		if leader == nil || !leader.IsLeader() {
			for _, m := range ms {
				if m.IsLeader() {
					leader = m
				}
			}
		}
		if leader == nil {
			return false
		}
		v, _ := voterIDs(members(t, leader))
		return len(v) == 4
	})
}
