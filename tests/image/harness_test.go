// Package imagetests drives `blockd volume export | import | clone`
// end to end: the real blockd binary (serve), the CLI, and real clients
// (qemu-io writes, nbdcopy captures, qemu-img compare) to check the bytes.
package imagetests

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/image"
	"github.com/blockd/blockd/internal/testenv"
)

var blockdBin string

func TestMain(m *testing.M) { os.Exit(testenv.MainWithBlockd(m, &blockdBin)) }

// serve is one `blockd serve` process (a single-node master and server).
type serve struct {
	t       testing.TB
	dataDir string
	nbd     string
	api     string
	env     []string
	cmd     *exec.Cmd
	log     *bytes.Buffer
	exited  chan struct{}
}

func startServe(t testing.TB, size string, env ...string) *serve {
	t.Helper()
	testenv.RequireTool(t, "qemu-io")
	s := &serve{t: t, dataDir: t.TempDir(), nbd: testenv.FreeAddr(t), api: testenv.FreeAddr(t), env: env}
	s.start(size)
	t.Cleanup(func() {
		s.stop()
		if strings.Contains(s.log.String(), "DATA RACE") {
			t.Error("the race detector reported a data race in blockd serve")
		}
		if t.Failed() {
			t.Logf("blockd serve log:\n%s", s.log)
		}
	})
	return s
}

func (s *serve) start(size string) {
	t := s.t
	t.Helper()
	s.cmd = exec.Command(blockdBin, "serve", "--log-file", "-", "--data", s.dataDir, "--nbd", s.nbd, "--api", s.api, "--volume", "vol0:"+size)
	s.cmd.Env = append(os.Environ(), s.env...)
	if s.log == nil {
		s.log = &bytes.Buffer{}
	}
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.exited = make(chan struct{})
	go func(c *exec.Cmd, ch chan struct{}) { _ = c.Wait(); close(ch) }(s.cmd, s.exited)
	s.waitVolume("vol0")
}

// waitVolume waits until the volume answers over NBD and its snapshot
// API (the primary holds its lease).
func (s *serve) waitVolume(vol string) {
	t := s.t
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, err1 := s.qemuIO(vol, "read 0 512")
		_, err2 := s.cli("snapshot", "list", vol)
		if err1 == nil && err2 == nil {
			return
		}
		select {
		case <-s.exited:
			t.Fatalf("blockd serve exited:\n%s", s.log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume %s did not come up in 60s: %v / %v\n%s", vol, err1, err2, s.log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *serve) stop() {
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
	}
}

func (s *serve) uri(vol string) string { return "nbd://" + s.nbd + "/" + vol }

// cli runs a blockd client command; the error carries stderr.
func (s *serve) cli(args ...string) (string, error) {
	return cliAt(s.api, args...)
}

func cliAt(master string, args ...string) (string, error) {
	args = append(args, "--master", master)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, blockdBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("blockd %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

func (s *serve) mustCLI(args ...string) string {
	s.t.Helper()
	out, err := s.cli(args...)
	if err != nil {
		s.t.Fatal(err)
	}
	return out
}

// cliFails runs a command that must fail with a one-line reason
// containing want.
func (s *serve) cliFails(want string, args ...string) string {
	s.t.Helper()
	out, err := s.cli(args...)
	if err == nil {
		s.t.Fatalf("blockd %s succeeded (%s), want a failure naming %q", strings.Join(args, " "), out, want)
	}
	msg := err.Error()
	if !strings.Contains(msg, want) {
		s.t.Fatalf("blockd %s: %v\nwant the reason to name %q", strings.Join(args, " "), err, want)
	}
	_, stderr, _ := strings.Cut(msg, ": exit status 1: ")
	if strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
		s.t.Fatalf("the reason is not one line:\n%s", stderr)
	}
	return msg
}

func (s *serve) qemuIO(vol string, cmds ...string) (string, error) {
	args := []string{"-f", "raw"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, s.uri(vol))
	out, err := exec.Command("qemu-io", args...).CombinedOutput()
	if err == nil && (strings.Contains(string(out), "failed") || strings.Contains(string(out), "error")) {
		err = errors.New("qemu-io reported a failure")
	}
	return string(out), err
}

func (s *serve) mustQemuIO(vol string, cmds ...string) {
	s.t.Helper()
	if out, err := s.qemuIO(vol, cmds...); err != nil {
		s.t.Fatalf("qemu-io %v: %v\n%s", cmds, err, out)
	}
}

// capture copies the volume as it is now to a raw file with nbdcopy.
func (s *serve) capture(vol, path string) {
	s.t.Helper()
	run(s.t, "nbdcopy", s.uri(vol), path)
}

// sameAs checks with qemu-img compare that the volume reads as the raw file.
func (s *serve) sameAs(vol, raw string) {
	s.t.Helper()
	run(s.t, "qemu-img", "compare", "-f", "raw", "-F", "raw", raw, s.uri(vol))
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	path := testenv.RequireTool(t, name)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// decodeTo writes the volume an image file describes to a raw file (a
// full image: everything without data reads as zeroes).
func decodeTo(t testing.TB, img, raw string) image.Header {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := image.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	h := r.Header()
	if err := out.Truncate(h.Size); err != nil {
		t.Fatal(err)
	}
	for {
		rec, err := r.Next()
		if errors.Is(err, io.EOF) {
			return h
		}
		if err != nil {
			t.Fatalf("decode %s: %v", img, err)
		}
		if rec.Zero {
			t.Fatalf("decode %s: a zero record in a full image", img)
		}
		if _, err := out.WriteAt(rec.Data, rec.Off); err != nil {
			t.Fatal(err)
		}
	}
}

func sameFile(t testing.TB, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x, y) {
		t.Fatalf("%s (%d bytes) and %s (%d bytes) differ", a, len(x), b, len(y))
	}
}
