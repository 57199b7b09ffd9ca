// Package nbdtests drives blockd's NBD server with real clients only:
// nbdinfo, fio, qemu-io, qemu-img, nbdcopy, nbdsh, nbdfuse + the kernel's
// loop device and ext4. The server is the real `blockd serve` binary, built
// once in TestMain.
package nbdtests

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
)

var blockdBin string

func TestMain(m *testing.M) { os.Exit(testenv.MainWithBlockd(m, &blockdBin)) }

// server is one running NBD server process over a data directory.
type server struct {
	t       *testing.T
	dataDir string
	addr    string
	apiAddr string
	cmd     *exec.Cmd
	log     *bytes.Buffer
	exited  chan struct{}
	flags   []string // extra `blockd serve` flags
}

const volSize = 1 << 30

func freePort(t *testing.T) string { return testenv.FreeAddr(t) }

// startServer starts a server on a fresh data directory.
func startServer(t *testing.T, flags ...string) *server {
	t.Helper()
	s := &server{t: t, dataDir: t.TempDir(), flags: flags}
	s.start()
	t.Cleanup(func() { s.stop() })
	return s
}

func (s *server) start() {
	t := s.t
	t.Helper()
	s.addr, s.apiAddr = freePort(t), freePort(t)
	args := append([]string{"serve", "--log-file", "-", "--data", s.dataDir, "--nbd", s.addr, "--api", s.apiAddr,
		"--volume", fmt.Sprintf("vol0:%d", volSize)}, s.flags...)
	s.cmd = exec.Command(blockdBin, args...)
	s.log = &bytes.Buffer{}
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.exited = make(chan struct{})
	go func(c *exec.Cmd, ch chan struct{}) { _ = c.Wait(); close(ch) }(s.cmd, s.exited)
	// Poll until a real client can negotiate.
	deadline := time.Now().Add(60 * time.Second)
	for {
		if err := exec.Command(testenv.RequireTool(t, "nbdinfo"), "--size", s.uri()).Run(); err == nil {
			return
		}
		select {
		case <-s.exited:
			t.Fatalf("server exited during start:\n%s", s.log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not come up in 60s:\n%s", s.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *server) uri() string { return "nbd://" + s.addr + "/vol0" }

// stop sends SIGTERM and waits (the server flushes and exits 0).
func (s *server) stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	select {
	case <-s.exited:
		return
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(60 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
		s.t.Errorf("server did not exit 60s after SIGTERM:\n%s", s.log)
	}
}

// kill9 kills the server with SIGKILL: no flush, no cleanup.
func (s *server) kill9() {
	_ = s.cmd.Process.Kill()
	<-s.exited
}

// run runs a client tool with a deadline and returns its combined output;
// a failure fails the test.
func run(t *testing.T, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := runErr(t, timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	path := testenv.RequireTool(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	// nbdsh needs the system python (the pyenv one lacks the nbd module).
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/usr/sbin:/sbin:/bin:"+os.Getenv("PATH"), "LIBNBD_DEBUG=0")
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("timed out after %v: %w", timeout, err)
	}
	return string(out), err
}

// writeRandomFile writes n pseudo-random bytes (deterministic per seed).
func writeRandomFile(t *testing.T, path string, n int, seed uint64) {
	t.Helper()
	b := make([]byte, n)
	x := seed*0x9E3779B97F4A7C15 + 1
	for i := 0; i+8 <= n; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		for j := 0; j < 8; j++ {
			b[i+j] = byte(x >> (8 * j))
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func sameFiles(t *testing.T, a, b string, n int) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(x) < n || len(y) < n {
		t.Fatalf("short files: %d, %d < %d", len(x), len(y), n)
	}
	if !bytes.Equal(x[:n], y[:n]) {
		t.Fatalf("%s and %s differ in the first %d bytes", a, b, n)
	}
}
