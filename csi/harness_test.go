package csi

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/tlsauth"
)

// A small harness of real processes: a `blockd master` and `blockd server`s
// on loopback, built from this module (as tests/cluster does).

var (
	buildOnce sync.Once
	blockdBin string
	buildErr  error
)

// buildBlockd builds cmd/blockd once per test process.
func buildBlockd(t *testing.T) string {
	t.Helper()
	goTool := testenv.RequireTool(t, "go")
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "blockd-csi-bin")
		if err != nil {
			buildErr = err
			return
		}
		blockdBin, buildErr = testenv.BuildBlockd(goTool, dir)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return blockdBin
}

func freeAddr(t *testing.T) string { return testenv.FreeAddr(t) }

type proc struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

// cluster is one master and some volume servers in a temp directory.
type cluster struct {
	t      *testing.T
	dir    string
	master string
	client *api.Client
	procs  []*proc
	creds  *tlsauth.Creds // a client's, in a TLS cluster
}

func (c *cluster) start(name string, args ...string) {
	c.t.Helper()
	logPath := filepath.Join(c.dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		c.t.Fatal(err)
	}
	cmd := exec.Command(buildBlockd(c.t), args...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		c.t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{}), log: logPath}
	go func() { _ = cmd.Wait(); f.Close(); close(p.done) }()
	c.procs = append(c.procs, p)
}

// newCluster starts a master and n servers and waits until all are alive.
func newCluster(t *testing.T, servers int) *cluster { return startCluster(t, servers, false) }

// newTLSCluster is newCluster with certificates from `blockd tls init`
// (master m1, servers s1..sN, client alice): every daemon serves TLS
// only. c.creds are alice's client credentials.
func newTLSCluster(t *testing.T, servers int) *cluster { return startCluster(t, servers, true) }

// tlsArgs are the --tls-* flags of the entity directory dir (prefix
// server or client).
func tlsArgs(dir, prefix string) []string {
	return []string{"--tls-cert", filepath.Join(dir, prefix+"-cert.pem"), "--tls-key", filepath.Join(dir, prefix+"-key.pem"),
		"--tls-ca", filepath.Join(dir, "ca-cert.pem")}
}

func startCluster(t *testing.T, servers int, withTLS bool) *cluster {
	c := &cluster{t: t, dir: t.TempDir(), master: freeAddr(t)}
	t.Cleanup(func() {
		for _, p := range c.procs {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(15 * time.Second):
				_ = p.cmd.Process.Kill()
				<-p.done
			}
		}
		if t.Failed() {
			for _, p := range c.procs {
				b, _ := os.ReadFile(p.log)
				if len(b) > 8000 {
					b = b[len(b)-8000:]
				}
				t.Logf("---- %s\n%s", filepath.Base(p.log), b)
			}
		}
	})
	var ids []string
	for i := 1; i <= servers; i++ {
		ids = append(ids, fmt.Sprintf("s%d", i))
	}
	tlsOf := func(kind, name, prefix string) []string { return nil }
	c.client = api.NewClient([]string{c.master})
	if withTLS {
		pki := filepath.Join(c.dir, "pki")
		out, err := exec.Command(buildBlockd(t), "tls", "init", "--dir", pki, "--master", "m1", "--server", strings.Join(ids, ","), "--client", "alice").CombinedOutput()
		if err != nil {
			t.Fatalf("tls init: %v\n%s", err, out)
		}
		tlsOf = func(kind, name, prefix string) []string { return tlsArgs(filepath.Join(pki, kind, name), prefix) }
		alice := filepath.Join(pki, "clients", "alice")
		if c.creds, err = tlsauth.Load(filepath.Join(alice, "client-cert.pem"), filepath.Join(alice, "client-key.pem"), filepath.Join(alice, "ca-cert.pem")); err != nil {
			t.Fatal(err)
		}
		c.client = api.NewClientTLS([]string{c.master}, c.creds.ClientConfig(tlsauth.AnyOf(tlsauth.KindMaster, tlsauth.KindServer)))
	}
	c.start("master", append([]string{"master", "--data", filepath.Join(c.dir, "master"), "--api", c.master, "--lease-ttl", "3s"},
		tlsOf("masters", "m1", "server")...)...)
	for _, id := range ids {
		c.start(id, append([]string{"server", "--id", id, "--data", filepath.Join(c.dir, id), "--master", c.master,
			"--listen", freeAddr(t), "--nbd", freeAddr(t), "--http", freeAddr(t), "--capacity", "20GiB"},
			tlsOf("servers", id, "server")...)...)
	}
	c.waitFor("servers alive", 60*time.Second, func() error {
		ss, err := c.client.Servers(context.Background())
		if err != nil {
			return err
		}
		alive := map[string]bool{}
		for _, s := range ss {
			alive[s.ServerID] = s.Alive
		}
		for _, id := range ids {
			if !alive[id] {
				return fmt.Errorf("server %s not alive (have %v)", id, alive)
			}
		}
		return nil
	})
	return c
}

func (c *cluster) waitFor(what string, d time.Duration, cond func() error) {
	c.t.Helper()
	testenv.WaitFor(c.t, what, d, cond)
}

// startDriver serves a driver in mode on a socket in a temp directory and
// returns its endpoint.
func startDriver(t *testing.T, masters []string, mode string) (string, *Driver) {
	t.Helper()
	return startDriverTLS(t, masters, mode, nil)
}

// startDriverTLS is startDriver with client credentials (nil: plain).
func startDriverTLS(t *testing.T, masters []string, mode string, creds *tlsauth.Creds) (string, *Driver) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "csi.sock")
	d, err := New(Config{Endpoint: "unix://" + sock, NodeID: "node-1", Masters: masters, Mode: mode, TLS: creds})
	if err != nil {
		t.Fatal(err)
	}
	l, err := Listen(d.cfg.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !strings.Contains(err.Error(), "closed") {
			t.Errorf("driver: %v", err)
		}
	})
	return "unix://" + sock, d
}
