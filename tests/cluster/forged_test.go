package cluster

import (
	"context"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// Issue 18 item 5 with real processes: a stranger's heartbeats claiming a
// live server's ID with its own endpoints are refused. The primary's
// replication traffic never reaches the stranger's listener, the primary
// never logs endpoint_moved, and GET /v1/volumes/NAME/primary keeps the
// real NBD address.
func TestForgedHeartbeatsRefused(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	c.startServer("s1")
	c.startServer("s2")
	info := c.createVolume(api.CreateVolumeRequest{Name: "v", SizeBytes: 16 << 20, RF: 2, Durability: api.DurabilitySyncAll})
	prim, repl := info.Primary.ServerID, info.Replicas[0].ServerID

	// The stranger's listener: anything the primary sends to the
	// "replica" it claims to be lands here.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var dialed atomic.Int64
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			dialed.Add(1)
			conn.Close()
		}
	}()
	forgedNBD := freePort(t)
	var refused, accepted int
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		for _, req := range []api.HeartbeatRequest{
			{ServerID: repl, Addr: ln.Addr().String(), NBDAddr: c.nbd[repl]},                       // redirect replication
			{ServerID: prim, Addr: argAfter(c.servers[prim].args, "--listen"), NBDAddr: forgedNBD}, // redirect clients
		} {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := c.client.Heartbeat(ctx, req)
			cancel()
			if api.IsCode(err, api.CodeAddressInUse) {
				refused++
			} else {
				accepted++
			}
		}
		p, err := c.client.PrimaryOf(context.Background(), "v")
		if err != nil || p.NBDAddr != c.nbd[prim] {
			t.Fatalf("GET primary after forged heartbeats: %+v %v (real NBD %s)", p, err, c.nbd[prim])
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("forged heartbeats: %d refused, %d accepted; the stranger's listener was dialed %d times", refused, accepted, dialed.Load())
	if accepted > 0 || dialed.Load() > 0 {
		t.Fatalf("forged heartbeats believed: %d accepted, %d connections to the stranger", accepted, dialed.Load())
	}
	b, _ := os.ReadFile(c.servers[prim].log)
	if strings.Contains(string(b), "endpoint_moved") {
		t.Fatalf("the primary moved a replica's endpoint on a forged heartbeat:\n%s", b)
	}
	if err := durableWrite(c.nbd[prim], "v", 0, 0x5a); err != nil {
		t.Fatalf("durable write after the forgery: %v", err)
	}
}

// argAfter returns the value that follows flag in args ("" if none).
func argAfter(args []string, flag string) string {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			return args[i+1]
		}
	}
	return ""
}
