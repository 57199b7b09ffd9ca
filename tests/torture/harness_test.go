package torture

import (
	"context"
	"fmt"
	"io"
	"net"
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

func freeAddr(t testing.TB) string { return testenv.FreeAddr(t) }

// proc is one blockd process logging to a file.
type proc struct {
	name   string
	args   []string
	env    []string // extra environment for the next start
	prefix []string // command that runs blockd (ip netns exec NS), if any
	log    string
	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{}
}

func (p *proc) start(t testing.TB) {
	t.Helper()
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(f, "==== %s start %s %v %v\n", time.Now().Format("15:04:05.000"), p.name, p.args, p.env)
	cmd := exec.Command(blockdBin, p.args...)
	if len(p.prefix) > 0 {
		cmd = exec.Command(p.prefix[0], append(append(p.prefix[1:len(p.prefix):len(p.prefix)], blockdBin), p.args...)...)
	}
	if len(p.env) > 0 {
		cmd.Env = append(os.Environ(), p.env...)
	}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", p.name, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); f.Close(); close(done) }()
	p.mu.Lock()
	p.cmd, p.done = cmd, done
	p.mu.Unlock()
}

func (p *proc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
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

// kill9 kills the process at once and waits until it is gone.
func (p *proc) kill9() {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGCONT)
	_ = cmd.Process.Kill()
	<-done
}

// cluster is one master and volume servers on loopback.
type cluster struct {
	t       testing.TB
	dir     string
	masters []*proc
	mAPIs   []string // each master's API address (its raft ID)
	mRaft   []string // each master's raft address
	mAPI    string   // mAPIs joined by commas (the CLI's --master)
	client  *api.Client
	mu      sync.Mutex
	servers map[string]*proc
	nbd     map[string]string      // server ID -> the NBD address clients dial
	proxies map[string]*proxy      // server ID -> proxy in front of its replication listener, if any
	mproxy  map[string]*masterLink // server ID -> its proxies to the masters, if any
	lab     *netLab                // servers in network namespaces, if set
	ports   map[string]int         // server ID -> port offset in its namespace (readdress)
}

func newCluster(t testing.TB) *cluster {
	c := &cluster{t: t, dir: t.TempDir(), servers: map[string]*proc{}, nbd: map[string]string{}, proxies: map[string]*proxy{}, mproxy: map[string]*masterLink{}, ports: map[string]int{}}
	t.Cleanup(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, s := range c.servers {
			s.kill9()
		}
		for _, m := range c.masters {
			m.kill9()
		}
		if t.Failed() || os.Getenv("TORTURE_KEEP_LOGS") != "" {
			c.saveLogs()
		}
	})
	return c
}

// saveLogs copies the process logs next to the artifacts (t.TempDir is
// deleted) and prints their tails.
func (c *cluster) saveLogs() {
	out := filepath.Join(ArtifactDir(), "logs-"+time.Now().UTC().Format("20060102T150405"))
	_ = os.MkdirAll(out, 0o755)
	logs, _ := filepath.Glob(filepath.Join(c.dir, "*.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		_ = os.WriteFile(filepath.Join(out, filepath.Base(l)), b, 0o644)
		if len(b) > 6000 {
			b = append([]byte("...\n"), b[len(b)-6000:]...)
		}
		c.t.Logf("---- %s\n%s", filepath.Base(l), b)
	}
	c.t.Logf("process logs saved in %s", out)
}

// startMaster starts one master (lease TTL leaseTTL) and waits until it
// leads; startMasters starts a raft cluster.
func (c *cluster) startMaster(leaseTTL time.Duration) { c.startMasters(1, leaseTTL) }

// addServer defines a server; with viaProxy its replication address and
// its link to the master go through proxies the schedule can slow down or
// cut.
func (c *cluster) addServer(id string, viaProxy bool) {
	if c.lab != nil {
		c.addNamespacedServer(id, viaProxy)
		return
	}
	listen := freeAddr(c.t)
	nbdAddr := freeAddr(c.t)
	master := c.mAPI
	c.mu.Lock()
	defer c.mu.Unlock()
	if viaProxy {
		master = c.masterLinks(id)
	}
	args := []string{"server", "--id", id, "--data", filepath.Join(c.dir, id),
		"--master", master, "--listen", listen, "--nbd", nbdAddr}
	if viaProxy {
		px := newProxy(c.t, listen)
		c.proxies[id] = px
		args = append(args, "--advertise", px.addr())
	}
	c.servers[id] = &proc{name: id, log: filepath.Join(c.dir, id+".log"), args: args}
	c.nbd[id] = nbdAddr
}

// addNamespacedServer: the server alone in its network namespace, on
// fixed ports of its own address; with viaProxy its master link and its
// replication address go through proxies on the bridge, as addServer's.
func (c *cluster) addNamespacedServer(id string, viaProxy bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ip := c.lab.ips[id]
	listen := net.JoinHostPort(ip, "7000")
	master := c.mAPI
	var extra []string
	if viaProxy {
		master = c.masterLinks(id)
		px := newProxyOn(c.t, c.lab.hostIP, listen)
		c.proxies[id] = px
		extra = []string{"--advertise", px.addr()}
	}
	args := append([]string{"server", "--id", id, "--data", filepath.Join(c.dir, id), "--master", master,
		"--listen", listen, "--nbd", net.JoinHostPort(ip, "10809"), "--insecure"}, extra...)
	c.servers[id] = &proc{name: id, log: filepath.Join(c.dir, id+".log"), args: args, prefix: c.lab.exec(id)}
	c.nbd[id] = net.JoinHostPort(ip, "10809")
}

// readdress gives a stopped server new listen and NBD ports (a restart
// with a changed address).
func (c *cluster) readdress(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.servers[id]
	listen, nbdAddr := freeAddr(c.t), freeAddr(c.t)
	if c.lab != nil {
		c.ports[id]++
		ip := c.lab.ips[id]
		listen = net.JoinHostPort(ip, fmt.Sprint(7000+c.ports[id]))
		nbdAddr = net.JoinHostPort(ip, fmt.Sprint(10809+c.ports[id]))
	}
	for i := 0; i < len(s.args)-1; i++ {
		switch s.args[i] {
		case "--listen":
			s.args[i+1] = listen
		case "--nbd":
			s.args[i+1] = nbdAddr
		}
	}
	if old := c.proxies[id]; old != nil {
		old.close()
		host := "127.0.0.1"
		if c.lab != nil {
			host = c.lab.hostIP
		}
		px := newProxyOn(c.t, host, listen)
		c.proxies[id] = px
		for i := 0; i < len(s.args)-1; i++ {
			if s.args[i] == "--advertise" {
				s.args[i+1] = px.addr()
			}
		}
	}
	c.nbd[id] = nbdAddr
}

func (c *cluster) server(id string) *proc {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.servers[id]
}

func (c *cluster) ids() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ids []string
	for id := range c.servers {
		ids = append(ids, id)
	}
	return ids
}

func (c *cluster) waitFor(what string, d time.Duration, cond func() error) {
	c.t.Helper()
	testenv.WaitFor(c.t, what, d, cond)
}

// waitUntil polls cond until it returns nil or d has passed.
func waitUntil(d time.Duration, cond func() error) error { return testenv.WaitUntil(d, cond) }

func (c *cluster) info(vol string) (*api.VolumeInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.client.VolumeInfo(ctx, vol)
}

// healthy reports nil once the volume has a primary and every replica is
// InSync.
func (c *cluster) healthy(vol string) error {
	info, err := c.info(vol)
	if err != nil {
		return err
	}
	if info.Status != api.StatusHealthy {
		var rs []string
		for _, r := range info.Replicas {
			rs = append(rs, r.ServerID+":"+r.State)
		}
		return fmt.Errorf("status %s, primary %s, replicas %s", info.Status, info.Primary.ServerID, strings.Join(rs, ","))
	}
	return nil
}

func (c *cluster) cli(args ...string) (string, error) {
	args = append(args, "--master", c.mAPI)
	out, err := exec.Command(blockdBin, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("blockd %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// proxy is a TCP relay that can delay its traffic (the replication links;
// the links to the masters are masterProxy's).
type proxy struct {
	ln     net.Listener
	mu     sync.Mutex
	target string
	delay  time.Duration
	conns  map[net.Conn]struct{}
	closed bool
}

func newProxy(t testing.TB, target string) *proxy { return newProxyOn(t, "127.0.0.1", target) }

// newProxyOn listens on host (the lab's bridge address, where namespaced
// servers reach it).
func newProxyOn(t testing.TB, host, target string) *proxy {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

// setDelay delays every chunk relayed from now on, both ways.
func (p *proxy) setDelay(d time.Duration) {
	p.mu.Lock()
	p.delay = d
	p.mu.Unlock()
}

func (p *proxy) getDelay() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.delay
}

func (p *proxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		target := p.target
		p.mu.Unlock()
		u, err := net.DialTimeout("tcp", target, 2*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			u.Close()
			return
		}
		p.conns[c], p.conns[u] = struct{}{}, struct{}{}
		p.mu.Unlock()
		go p.pipe(u, c)
		go p.pipe(c, u)
	}
}

func (p *proxy) pipe(dst, src net.Conn) {
	defer func() {
		dst.Close()
		src.Close()
		p.mu.Lock()
		delete(p.conns, dst)
		delete(p.conns, src)
		p.mu.Unlock()
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if d := p.getDelay(); d > 0 {
				time.Sleep(d)
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if err != io.EOF {
				return
			}
			return
		}
	}
}

// reset closes every relayed connection (the listener stays).
func (p *proxy) reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

func (p *proxy) close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.ln.Close()
	p.reset()
}
