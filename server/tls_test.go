package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/master"
	"github.com/blockd/blockd/nbd/client"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/server"
	"github.com/blockd/blockd/tlsauth"
)

type syncLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *syncLog) wait(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		l.mu.Lock()
		ok := strings.Contains(l.b.String(), s)
		l.mu.Unlock()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			l.mu.Lock()
			defer l.mu.Unlock()
			t.Fatalf("log lacks %q:\n%s", s, l.b.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func creds(t *testing.T, dir, kind, name string) *tlsauth.Creds {
	t.Helper()
	p := "server"
	if kind == "clients" {
		p = "client"
	}
	d := filepath.Join(dir, kind, name)
	c, err := tlsauth.Load(filepath.Join(d, p+"-cert.pem"), filepath.Join(d, p+"-key.pem"), filepath.Join(d, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func freeAddr(t *testing.T) string { return testenv.FreeAddr(t) }

// TestTLSCluster: a master (API and raft over TLS) and two servers with
// certificates; a replicated volume written over NBD/TLS with sync_all
// (so the replication link over TLS carries it); then the strangers:
// a server's certificate heartbeating for another ID, a client
// certificate at the replication port, a server certificate opening a
// session in the name of another server, a certificate of another CA at
// the API, a plain API client.
func TestTLSCluster(t *testing.T) {
	dir := t.TempDir()
	if _, err := tlsauth.Init(dir, tlsauth.InitOptions{Masters: []string{"m1"}, Servers: []string{"s1", "s2", "s3"}, Clients: []string{"alice"}}); err != nil {
		t.Fatal(err)
	}
	mlog, slog1 := &syncLog{}, &syncLog{}
	apiAddr, raftAddr := freeAddr(t), freeAddr(t)
	m, err := master.Start(master.Config{DataDir: filepath.Join(t.TempDir(), "m"), APIAddr: apiAddr, RaftAddr: raftAddr,
		Peers: []string{apiAddr + "=" + raftAddr}, TLS: creds(t, dir, "masters", "m1"), Logger: slog.New(slog.NewTextHandler(mlog, nil)),
		LeaseTTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := m.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	var srvs []*server.Server
	for i, id := range []string{"s1", "s2"} {
		lg := slog.New(slog.NewTextHandler(&syncLog{}, nil))
		if i == 1 {
			lg = slog.New(slog.NewTextHandler(slog1, nil))
		}
		s, err := server.New(server.Config{DataDir: t.TempDir(), ServerID: id, Listen: "127.0.0.1:0", NBD: "127.0.0.1:0",
			Masters: []string{apiAddr}, TLS: creds(t, dir, "servers", id), Logger: lg, CapacityBytes: 1 << 30})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		srvs = append(srvs, s)
	}
	alice := creds(t, dir, "clients", "alice")
	cl := api.NewClientTLS([]string{apiAddr}, alice.ClientConfig(tlsauth.Expect(tlsauth.KindMaster, "m1")))
	var info *api.VolumeInfo
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err = cl.CreateVolume(ctx, api.CreateVolumeRequest{Name: "v1", SizeBytes: 64 << 20, RF: 2, Durability: api.DurabilitySyncAll, Preset: "general"})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("create volume over TLS: %v", err)
	}
	for {
		info, err = cl.VolumeInfo(ctx, "v1")
		if err == nil && len(info.Replicas) == 1 && info.Replicas[0].State == "InSync" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replica not in sync over TLS: %+v %v", info, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	primary, replica := srvs[0], srvs[1]
	if info.Primary.ServerID == "s2" {
		primary, replica = srvs[1], srvs[0]
	}
	// NBD over TLS to the primary; a sync_all flush needs the replica's ack.
	dev, err := client.Dial(ctx, client.Options{Export: "v1", Wait: 10 * time.Second, GiveUp: 10 * time.Second,
		Resolve: func(context.Context) (string, error) { return primary.NBDAddr(), nil },
		TLS:     alice.ClientConfig(tlsauth.Expect(tlsauth.KindServer, info.Primary.ServerID))})
	if err != nil {
		t.Fatalf("NBD over TLS: %v", err)
	}
	defer dev.Close()
	buf := bytes.Repeat([]byte{0xab}, 64<<10)
	if err := dev.WriteAt(buf, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := dev.Flush(); err != nil {
		t.Fatalf("sync_all flush over TLS replication: %v", err)
	}

	// 1. s3's certificate heartbeating as s1: forbidden.
	s3 := creds(t, dir, "servers", "s3")
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: s3.ClientConfig(nil)}}
	body, _ := json.Marshal(api.HeartbeatRequest{ServerID: "s1", Addr: "127.0.0.1:1"})
	resp, err := hc.Post("https://"+apiAddr+"/v1/heartbeat", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("heartbeat for s1 with s3's certificate: %s", resp.Status)
	}
	mlog.wait(t, `msg=api_refused`)
	mlog.wait(t, `heartbeat for server \"s1\" from the certificate of server \"s3\"`)

	// 2. A client certificate at the replication port: handshake refused.
	c, err := tls.Dial("tcp", replica.Addr(), alice.ClientConfig(nil))
	if err == nil {
		_, err = c.Read(make([]byte, 1))
		c.Close()
	}
	if err == nil {
		t.Fatal("client certificate accepted at the replication port")
	}
	t.Logf("client cert at replication port: %v", err)

	// 3. s3's certificate, Hello in the name of the primary: refused.
	c, err = tls.Dial("tcp", replica.Addr(), s3.ClientConfig(tlsauth.Expect(tlsauth.KindServer, replica.ID())))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	hello := replication.Hello{PrimaryID: info.Primary.ServerID, TargetServerID: replica.ID(), RegionSize: 64 << 10}
	if err := replication.WriteFrame(c, &replication.Msg{Type: replication.MsgHello, Volume: "v1", Epoch: info.Epoch, Session: 99, Payload: hello.Encode()}); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	msg, err := replication.NewMsgReader(c).Read()
	if err != nil {
		t.Fatal(err)
	}
	eb, _ := replication.DecodeErrorBody(msg.Payload)
	if msg.Type != replication.MsgError || eb.Code != replication.CodeWrongPrimary || !strings.Contains(eb.Message, `certificate names "s3"`) {
		t.Fatalf("impostor hello answered %v %+v", msg.Type, eb)
	}
	t.Logf("impostor hello: %s: %s", eb.Code, eb.Message)
	slog1buf := slog1
	if replica == srvs[0] {
		t.Log("replica is s1; its log is not captured")
	} else {
		slog1buf.wait(t, "certificate names")
	}

	// 4. A certificate from another CA at the API.
	other := t.TempDir()
	if _, err := tlsauth.Init(other, tlsauth.InitOptions{Clients: []string{"mallory"}}); err != nil {
		t.Fatal(err)
	}
	mal := creds(t, other, "clients", "mallory")
	mal.Pool = alice.Pool
	mc := api.NewClientTLS([]string{apiAddr}, mal.ClientConfig(nil))
	mc.RetryFor = 0
	_, err = mc.ListVolumes(ctxOnce(t))
	if err == nil {
		t.Fatal("another CA's certificate was answered")
	}
	t.Logf("other CA at the API: %v", err)
	mlog.wait(t, "api_tls_refused")

	// 5. A plain client against the TLS master.
	plain := api.NewClient([]string{apiAddr})
	plain.RetryFor = 0
	_, err = plain.ListVolumes(ctxOnce(t))
	if err == nil || !strings.Contains(err.Error(), "requires TLS: give --tls-cert") {
		t.Fatalf("plain API client: %v", err)
	}
	t.Logf("plain API client: %v", err)

	// The cluster is undisturbed: the volume still takes writes.
	if err := dev.WriteAt(buf, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := dev.Flush(); err != nil {
		t.Fatalf("flush after the strangers: %v", err)
	}
}

func ctxOnce(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}
