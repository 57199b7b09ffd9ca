package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/nbd/client"
	"github.com/blockd/blockd/tlsauth"
)

// TestTLSAllowList: a volume's allow list (raft state) is checked by its
// primary at NBD_OPT_GO: alice (read-only) reads and cannot write, bob is
// refused with the reason, carol (read-write) writes; once carol is
// removed from the list her next reconnect (the primary restarted) is
// refused and logged.
func TestTLSAllowList(t *testing.T) {
	c := startTLSCluster(t)
	if out, err := c.tlsCLI("volume", "create", "acl", "--size", "64MiB", "--rf", "1", "--allow", "alice:ro", "--allow", "carol"); err != nil {
		t.Fatalf("volume create --allow: %v\n%s", err, out)
	}
	info := c.waitHealthy("acl", 60*time.Second)
	out, err := c.tlsCLI("volume", "info", "acl")
	if err != nil || !strings.Contains(out, "alice:ro, carol") {
		t.Fatalf("volume info shows the allow list: %v\n%s", err, out)
	}
	primary := info.Primary.ServerID
	host, port, _ := net.SplitHostPort(c.nbd[primary])
	qio := func(who string, cmds ...string) (string, error) {
		var args []string
		if who == "alice" && !strings.HasPrefix(cmds[0], "write") {
			args = append(args, "-r") // her grant is read-only
		}
		args = append(args, "--object", "tls-creds-x509,id=t0,endpoint=client,dir="+filepath.Join(c.pki, "clients", who),
			"--image-opts", fmt.Sprintf("driver=nbd,host=%s,port=%s,export=acl,tls-creds=t0", host, port))
		for _, x := range cmds {
			args = append(args, "-c", x)
		}
		o, err := exec.Command("qemu-io", args...).CombinedOutput()
		return string(o), err
	}
	if out, err := qio("alice", "read 0 64k"); err != nil || strings.Contains(out, "failed") {
		t.Fatalf("alice (read-only) reads: %v\n%s", err, out)
	}
	out, err = qio("alice", "write -P 1 0 4k")
	if err == nil || !strings.Contains(out, "Permission denied") {
		t.Fatalf("alice opened her read-only grant for writing: %v\n%s", err, out)
	}
	t.Logf("alice's write: %s", strings.TrimSpace(out))
	out, err = qio("bob", "read 0 4k")
	if err == nil || !strings.Contains(out, `client "bob" is not on the allow list of volume acl`) {
		t.Fatalf("bob: %v\n%s", err, out)
	}
	t.Logf("refused: bob: %s", strings.Join(strings.Fields(out), " "))
	c.waitLog(primary, "access_refused")

	// carol attaches with the userspace client (attach ublk's backend) and writes.
	carol := loadCreds(t, filepath.Join(c.pki, "clients", "carol"), "client")
	logs := &lockedLog{}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	dev, err := client.Dial(ctx, client.Options{Export: "acl", Wait: 10 * time.Second, GiveUp: 15 * time.Second,
		Resolve: func(context.Context) (string, error) { return c.nbd[primary], nil },
		TLS:     carol.ClientConfig(tlsauth.Expect(tlsauth.KindServer, primary)), Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatalf("carol attaches: %v", err)
	}
	defer dev.Close()
	buf := make([]byte, 4096)
	if err := dev.WriteAt(buf, 0, true); err != nil {
		t.Fatalf("carol writes: %v", err)
	}
	// Revoke carol while she is attached.
	if out, err := c.tlsCLI("volume", "update", "acl", "--allow", "alice:ro"); err != nil {
		t.Fatalf("volume update --allow: %v\n%s", err, out)
	}
	c.waitFor("the primary learns the new list", 30*time.Second, func() error {
		out, _ := qio("carol", "read 0 4k")
		if !strings.Contains(out, "not on the allow list") {
			return fmt.Errorf("carol still admitted: %s", out)
		}
		return nil
	})
	// Her attached device reconnects after the primary restarts: refused.
	before := c.logLen(primary)
	c.servers[primary].stop()
	c.servers[primary].start(t)
	err = dev.WriteAt(buf, 4096, true)
	if err == nil {
		t.Fatal("carol's write after her revocation and a reconnect succeeded")
	}
	t.Logf("carol after revocation: %v", err)
	c.waitFor("carol's reconnect refused in the primary's log", 30*time.Second, func() error {
		if !strings.Contains(c.logSince(primary, before), `msg=nbd_access_refused server=`+primary+` export=acl client=carol`) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	if !strings.Contains(logs.String(), "not on the allow list") {
		t.Errorf("carol's client log lacks the reason:\n%s", logs.String())
	}
	if out, err := qio("alice", "read 0 64k"); err != nil || strings.Contains(out, "failed") {
		t.Fatalf("alice after the restart: %v\n%s", err, out)
	}
}

// lockedLog is a log sink safe for concurrent writers.
type lockedLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (c *tlsCluster) logLen(name string) int {
	b, _ := os.ReadFile(filepath.Join(c.dir, name+".log"))
	return len(b)
}

func (c *tlsCluster) logSince(name string, off int) string {
	b, _ := os.ReadFile(filepath.Join(c.dir, name+".log"))
	if off > len(b) {
		return ""
	}
	return string(b[off:])
}
