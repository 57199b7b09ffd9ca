// Package cluster runs real blockd processes (masters and volume servers)
// on loopback and drives them with the CLI, the api client and real NBD
// clients (qemu-io), to prove failover, rejoin and master restarts end to
// end.
package cluster

import (
	"bytes"
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
)

var blockdBin string

func TestMain(m *testing.M) { os.Exit(testenv.MainWithBlockd(m, &blockdBin)) }

// freePort returns a loopback address nobody listens on right now.
func freePort(t *testing.T) string { return testenv.FreeAddr(t) }

// proc is one blockd process; its combined output goes to a log file that
// is printed when the test fails.
type proc struct {
	name string
	args []string
	env  []string // added to the environment (e.g. BLOCKD_VFS_FAULTS)
	log  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

func (p *proc) start(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "==== start %s %v\n", p.name, p.args)
	p.cmd = exec.Command(blockdBin, p.args...)
	if p.env != nil {
		p.cmd.Env = append(os.Environ(), p.env...)
	}
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if err := p.cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", p.name, err)
	}
	p.done = make(chan struct{})
	go func() { p.err = p.cmd.Wait(); f.Close(); close(p.done) }()
}

func (p *proc) running() bool {
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

func (p *proc) signal(sig syscall.Signal) {
	if p.running() {
		_ = p.cmd.Process.Signal(sig)
	}
}

// kill9 kills the process at once: no flush, no goodbye.
func (p *proc) kill9() {
	if p.running() {
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) stop() {
	if !p.running() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.kill9()
	}
}

// cluster is masters and servers sharing one temp directory.
type cluster struct {
	t       *testing.T
	dir     string
	masters []*proc
	mAPI    []string
	servers map[string]*proc
	nbd     map[string]string
	http    map[string]string // each server's admin API (--http)
	mu      sync.Mutex
	client  *api.Client
}

func newCluster(t *testing.T) *cluster {
	testenv.RequireTool(t, "qemu-io")
	testenv.RequireTool(t, "nbdsh")
	c := &cluster{t: t, dir: t.TempDir(), servers: map[string]*proc{}, nbd: map[string]string{}, http: map[string]string{}}
	t.Cleanup(func() {
		for _, s := range c.servers {
			s.signal(syscall.SIGCONT)
			s.kill9()
		}
		for _, m := range c.masters {
			m.kill9()
		}
		if t.Failed() {
			c.dumpLogs()
		}
	})
	return c
}

func (c *cluster) dumpLogs() {
	logs, _ := filepath.Glob(filepath.Join(c.dir, "*.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		if len(b) > 12000 {
			b = append([]byte("...\n"), b[len(b)-12000:]...)
		}
		c.t.Logf("---- %s\n%s", filepath.Base(l), b)
	}
}

// startMaster starts a single-node master (fast leases for tests).
func (c *cluster) startMaster(extra ...string) *proc {
	addr := freePort(c.t)
	m := &proc{name: "master", log: filepath.Join(c.dir, fmt.Sprintf("master%d.log", len(c.masters))),
		args: append([]string{"master", "--data", filepath.Join(c.dir, fmt.Sprintf("master%d", len(c.masters))),
			"--api", addr, "--lease-ttl", "3s"}, extra...)}
	m.start(c.t)
	c.masters = append(c.masters, m)
	c.mAPI = append(c.mAPI, addr)
	c.client = api.NewClient(c.mAPI)
	c.waitFor("master leader", 30*time.Second, func() error {
		st, err := c.client.Status(context.Background(), addr)
		if err != nil {
			return err
		}
		if !st.IsLeader {
			return fmt.Errorf("not leader yet (%s)", st.State)
		}
		return nil
	})
	return m
}

// startServer starts (or restarts, keeping its data and ports) a volume server.
func (c *cluster) startServer(id string) *proc {
	c.mu.Lock()
	s := c.servers[id]
	if s == nil {
		nbdAddr, httpAddr := freePort(c.t), freePort(c.t)
		s = &proc{name: id, log: filepath.Join(c.dir, id+".log"),
			args: []string{"server", "--id", id, "--data", filepath.Join(c.dir, id),
				"--master", strings.Join(c.mAPI, ","), "--listen", freePort(c.t), "--nbd", nbdAddr, "--http", httpAddr}}
		c.servers[id] = s
		c.nbd[id] = nbdAddr
		c.http[id] = httpAddr
	}
	c.mu.Unlock()
	s.start(c.t)
	c.waitFor("server "+id+" registered", 30*time.Second, func() error {
		srvs, err := c.client.Servers(context.Background())
		if err != nil {
			return err
		}
		for _, si := range srvs {
			if si.ServerID == id && si.Alive {
				return nil
			}
		}
		return fmt.Errorf("server %s not alive at the master", id)
	})
	return s
}

func (c *cluster) waitFor(what string, d time.Duration, cond func() error) {
	c.t.Helper()
	testenv.WaitFor(c.t, what, d, cond)
}

// cli runs a blockd client command against the masters.
func (c *cluster) cli(args ...string) (string, error) {
	args = append(args, "--master", strings.Join(c.mAPI, ","))
	cmd := exec.Command(blockdBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("blockd %s: %v: %s", strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

func (c *cluster) info(vol string) *api.VolumeInfo {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := c.client.VolumeInfo(ctx, vol)
	if err != nil {
		c.t.Fatalf("volume info %s: %v", vol, err)
	}
	return info
}

// waitHealthy waits until the volume has a confirmed primary and every
// replica is InSync.
func (c *cluster) waitHealthy(vol string, d time.Duration) *api.VolumeInfo {
	c.t.Helper()
	var info *api.VolumeInfo
	c.waitFor(vol+" healthy", d, func() error {
		var err error
		info, err = c.client.VolumeInfo(context.Background(), vol)
		if err != nil {
			return err
		}
		if info.Status != api.StatusHealthy {
			return fmt.Errorf("status %s, replicas %+v", info.Status, info.Replicas)
		}
		return nil
	})
	return info
}

// qemuIO runs qemu-io commands against the volume on a server's NBD port.
func (c *cluster) qemuIO(nbdAddr, vol string, cmds ...string) (string, error) {
	args := []string{"-f", "raw"}
	for _, x := range cmds {
		args = append(args, "-c", x)
	}
	args = append(args, fmt.Sprintf("nbd://%s/%s", nbdAddr, vol))
	out, err := exec.Command("qemu-io", args...).CombinedOutput()
	s := string(out)
	if err == nil && (strings.Contains(s, "Pattern verification failed") || strings.Contains(s, "failed:")) {
		err = fmt.Errorf("qemu-io reported a failure")
	}
	return s, err
}

// nbdshWrite writes one 4 KiB block with libnbd and disconnects without a
// flush.
func nbdshWrite(nbdAddr, vol string, off int64) error {
	script := fmt.Sprintf("h.pwrite(b'\\x5a' * 4096, %d)", off)
	cmd := exec.Command("nbdsh", "-u", fmt.Sprintf("nbd://%s/%s", nbdAddr, vol), "-c", script)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("nbdsh: %v: %s", err, out)
	}
	return nil
}

// waitExport waits until a server exports the volume: the master's record
// of a new primary reaches the server with its next heartbeat.
func (c *cluster) waitExport(nbdAddr, vol string) {
	c.t.Helper()
	c.waitFor(vol+" exported at "+nbdAddr, 30*time.Second, func() error {
		out, err := c.qemuIO(nbdAddr, vol, "read 0 512")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
}
