package cluster

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
)

// TestTLSPlainProtocolClients: at a cluster started with certificates, a
// plain client speaking each inner port's own protocol is refused:
//   - at the master's raft port, hashicorp/raft's own TCP transport (plain
//     stream layer) sending a RequestVote and an AppendEntries of a term far
//     ahead, which would depose the leader if they were heard;
//   - at each server's replication port, a well-formed replication Hello
//     frame (replication.WriteFrame) naming the volume's real primary,
//     replica and epoch, which would open a session if it were heard.
//
// Each is closed before a byte of its protocol is read; the master and
// the replica log the refusal with its cause (a plain client: the first
// bytes are not a TLS ClientHello); the leader's term does not move, no
// replication session is opened, and a FUA write and read-back over NBD
// (qemu-io with TLS) keeps working during and after the strangers.
func TestTLSPlainProtocolClients(t *testing.T) {
	c := startTLSCluster(t)
	if out, err := c.tlsCLI("volume", "create", "db", "--size", "64MiB", "--rf", "2", "--durability", "sync_all"); err != nil {
		t.Fatalf("volume create over TLS: %v\n%s", err, out)
	}
	info := c.waitHealthy("db", 60*time.Second)
	primary := info.Primary.ServerID
	replica := ""
	for _, r := range info.Replicas {
		replica = r.ServerID
	}
	if replica == "" || replica == primary {
		t.Fatalf("db has no replica: %+v", info)
	}
	st0, err := c.client.Status(context.Background(), c.mAPI[0])
	if err != nil {
		t.Fatal(err)
	}

	// FUA writes and read-backs on the replicated volume throughout.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ios atomic.Int64
	ioErr := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			p := 0x20 + i%64
			off := (i % 16) << 20
			if out, err := c.qemuIOTLS(c.nbd[primary], "db", fmt.Sprintf("write -f -P 0x%02x %d 64k", p, off),
				fmt.Sprintf("read -P 0x%02x %d 64k", p, off)); err != nil {
				ioErr <- fmt.Errorf("FUA write + read %d: %v\n%s", i, err, out)
				return
			}
			ios.Add(1)
		}
	}()
	waitIOs := func(what string, n int64) {
		t.Helper()
		c.waitFor(what, 60*time.Second, func() error {
			select {
			case err := <-ioErr:
				t.Fatal(err)
			default:
			}
			if ios.Load() < n {
				return fmt.Errorf("%d FUA writes so far", ios.Load())
			}
			return nil
		})
	}
	waitIOs("a first FUA write over TLS", 1)

	// hashicorp/raft's plain TCP transport at the raft port, a new one for
	// each RPC (a transport pools its connection, and the refused one is
	// closed).
	plainRaft := func(rpc func(*raft.NetworkTransport, raft.RPCHeader) error) error {
		trans, err := raft.NewTCPTransport("127.0.0.1:0", nil, 1, 10*time.Second, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		defer trans.Close()
		return rpc(trans, raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("intruder"), Addr: []byte(trans.LocalAddr())})
	}
	target := raft.ServerAddress(c.raftAddr)
	raftWant := "this raft port requires mutual TLS"
	for _, rpc := range []struct {
		name string
		call func(*raft.NetworkTransport, raft.RPCHeader) error
	}{
		{"RequestVote", func(tr *raft.NetworkTransport, h raft.RPCHeader) error {
			var resp raft.RequestVoteResponse
			return tr.RequestVote("intruder", target, &raft.RequestVoteRequest{RPCHeader: h,
				Term: st0.Term + 1000, LastLogIndex: 1 << 40, LastLogTerm: st0.Term + 1000}, &resp)
		}},
		{"AppendEntries", func(tr *raft.NetworkTransport, h raft.RPCHeader) error {
			var resp raft.AppendEntriesResponse
			return tr.AppendEntries("intruder", target, &raft.AppendEntriesRequest{RPCHeader: h,
				Term: st0.Term + 1000, PrevLogEntry: 1 << 40, PrevLogTerm: st0.Term + 1000, LeaderCommitIndex: 1 << 40}, &resp)
		}},
	} {
		err := plainRaft(rpc.call)
		if err == nil || !strings.Contains(err.Error(), raftWant) {
			t.Fatalf("plain raft %s: %v; want the error %q", rpc.name, err, raftWant)
		}
		t.Logf("refused: plain raft %s at the raft port: client error %q", rpc.name, err)
	}
	line := c.waitLogLine("master0", "raft_tls_refused")
	t.Logf("master log: %s", line)
	for _, want := range []string{"plain client", "not a TLS ClientHello"} {
		if !strings.Contains(line, want) {
			t.Errorf("master's refusal %q does not say %q", line, want)
		}
	}

	// A replication Hello in plaintext, at the replica (the session it
	// would open) and at the primary.
	for _, to := range []string{replica, primary} {
		before := c.logCount(to, "msg=session_created")
		conn := dial(t, c.repl[to])
		bw := bufio.NewWriter(conn)
		hello := replication.Hello{PrimaryID: primary, TargetServerID: to, HeadLSN: info.HeadLSN, OldestLSN: 1,
			RegionSize: 1 << 20, EpochStartLSN: 1}
		if err := replication.WriteFrame(bw, &replication.Msg{Type: replication.MsgHello, Volume: "db", Epoch: info.Epoch,
			Session: 1 << 50, LSNFrom: replication.HelloFeatSnapshots, Payload: hello.Encode()}); err != nil {
			t.Fatal(err)
		}
		if err := bw.Flush(); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		m, err := replication.NewMsgReader(conn).Read()
		if err != nil {
			t.Fatalf("plain replication Hello at %s: no refusal frame: %v", to, err)
		}
		eb, _ := replication.DecodeErrorBody(m.Payload)
		refusal := (&replication.RemoteError{ErrorBody: eb}).Error()
		if m.Type != replication.MsgError || !strings.Contains(eb.Message, "this replication port requires mutual TLS") {
			t.Fatalf("plain replication Hello at %s answered %v: %s", to, m.Type, refusal)
		}
		if _, err := replication.NewMsgReader(conn).Read(); err == nil || isTimeout(err) {
			t.Fatalf("plain replication Hello at %s: the connection stays open after the refusal (%v)", to, err)
		}
		conn.Close()
		t.Logf("refused: plain replication Hello at %s's replication port: client reads %q", to, refusal)
		line := c.waitLogLine(to, "replication_tls_refused")
		t.Logf("%s log: %s", to, line)
		for _, want := range []string{"plain client", "not a TLS ClientHello"} {
			if !strings.Contains(line, want) {
				t.Errorf("%s's refusal %q does not say %q", to, line, want)
			}
		}
		if n := c.logCount(to, "msg=session_created"); n != before {
			t.Errorf("%s opened a replication session for the plain Hello (%d -> %d)", to, before, n)
		}
	}

	// Undisturbed: more FUA writes after the strangers, the leader kept its
	// term, the volume is still healthy with both copies.
	n := ios.Load()
	waitIOs("FUA writes after the strangers", n+3)
	close(stop)
	wg.Wait()
	select {
	case err := <-ioErr:
		t.Fatal(err)
	default:
	}
	t.Logf("%d FUA writes with read-back during and after the strangers", ios.Load())
	st, err := c.client.Status(context.Background(), c.mAPI[0])
	if err != nil {
		t.Fatal(err)
	}
	if !st.IsLeader || st.Term != st0.Term {
		t.Fatalf("master after the plain raft RPCs: leader %v term %d (was %d)", st.IsLeader, st.Term, st0.Term)
	}
	after := c.info("db")
	if after.Status != api.StatusHealthy || after.Epoch != info.Epoch || after.Primary.ServerID != primary {
		t.Fatalf("db after the strangers: status %s epoch %d primary %s (was epoch %d primary %s)",
			after.Status, after.Epoch, after.Primary.ServerID, info.Epoch, primary)
	}
	for _, p := range append([]*proc{c.masters[0]}, c.servers[primary], c.servers[replica]) {
		if !p.running() {
			t.Fatalf("%s exited", p.name)
		}
	}
	noPanics(t, c.cluster)
}

// qemuIOTLS runs qemu-io commands against vol on nbdAddr with alice's
// client certificate.
func (c *tlsCluster) qemuIOTLS(nbdAddr, vol string, cmds ...string) (string, error) {
	host, port, _ := net.SplitHostPort(nbdAddr)
	args := []string{"--object", "tls-creds-x509,id=t0,endpoint=client,dir=" + filepath.Join(c.pki, "clients", "alice"),
		"--image-opts", fmt.Sprintf("driver=nbd,host=%s,port=%s,export=%s,tls-creds=t0", host, port, vol)}
	for _, x := range cmds {
		args = append(args, "-c", x)
	}
	out, err := runQemuIO(args)
	if err == nil && (strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed:")) {
		err = fmt.Errorf("qemu-io reported a failure")
	}
	return out, err
}

// waitLogLine waits for a line of a process's log containing s and
// returns it.
func (c *tlsCluster) waitLogLine(name, s string) string {
	c.t.Helper()
	var line string
	c.waitFor(name+" log: "+s, 30*time.Second, func() error {
		for _, l := range strings.Split(c.logText(name), "\n") {
			if strings.Contains(l, s) {
				line = l
				return nil
			}
		}
		return fmt.Errorf("not yet")
	})
	return line
}

func isTimeout(err error) bool {
	var ne net.Error
	return errorsAs(err, &ne) && ne.Timeout()
}

func (c *tlsCluster) logCount(name, s string) int { return strings.Count(c.logText(name), s) }

func (c *tlsCluster) logText(name string) string {
	b, _ := os.ReadFile(filepath.Join(c.dir, name+".log"))
	return string(b)
}

func runQemuIO(args []string) (string, error) {
	out, err := exec.Command("qemu-io", args...).CombinedOutput()
	return string(out), err
}
