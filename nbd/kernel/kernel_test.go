package kernel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/nbd/wire"
)

// zeroDev is the smallest real blockdev.Device: reads return zeroes.
type zeroDev struct{ size int64 }

func (d zeroDev) Size() int64                               { return d.size }
func (d zeroDev) BlockSize() int                            { return 4096 }
func (d zeroDev) ReadAt(p []byte, off int64) error          { clear(p); return nil }
func (d zeroDev) WriteAt(p []byte, off int64, _ bool) error { return nil }
func (d zeroDev) Flush() error                              { return nil }
func (d zeroDev) Trim(off, n int64) error                   { return nil }
func (d zeroDev) WriteZeroes(off, n int64, _ bool) error    { return nil }
func (d zeroDev) BlockStatus(off, n int64) ([]blockdev.Extent, error) {
	return nil, blockdev.ErrInvalid
}

func startServer(t *testing.T, exports ...nbd.Export) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := nbd.NewServer(nbd.StaticExports(exports), nbd.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	go s.Serve(l)
	t.Cleanup(func() { s.Close() })
	return l.Addr().String()
}

func dialNegotiate(t *testing.T, addr, name string) (Export, net.Conn, error) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	e, err := Negotiate(c, name, time.Now().Add(10*time.Second))
	return e, c, err
}

// TestNegotiateBlockdServer runs the handshake against blockd's own NBD
// server on loopback, then uses the connection in the transmission phase.
func TestNegotiateBlockdServer(t *testing.T) {
	addr := startServer(t, nbd.Export{Name: "vol0", Device: zeroDev{64 << 20}}, nbd.Export{Name: "ro", Device: zeroDev{1 << 20}, ReadOnly: true})
	e, c, err := dialNegotiate(t, addr, "vol0")
	if err != nil {
		t.Fatal(err)
	}
	if e.Size != 64<<20 {
		t.Errorf("size %d", e.Size)
	}
	for _, f := range []uint16{wire.FlagHasFlags, wire.FlagSendFlush, wire.FlagSendFUA, wire.FlagCanMultiConn} {
		if e.Flags&f == 0 {
			t.Errorf("flags %#x lack %#x", e.Flags, f)
		}
	}
	if e.Flags&wire.FlagReadOnly != 0 {
		t.Errorf("vol0 reported read-only")
	}
	// Transmission phase works on the negotiated socket: a simple-reply READ.
	req := make([]byte, 28)
	putBE32(req[0:], wire.MagicRequest)
	putBE16(req[6:], 0) // NBD_CMD_READ
	putBE64(req[8:], 42)
	putBE64(req[16:], 4096)
	putBE32(req[24:], 4096)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	rep := make([]byte, 16+4096)
	if _, err := io.ReadFull(c, rep); err != nil {
		t.Fatalf("read reply: %v", err)
	}
	if be32(rep[0:]) != wire.MagicSimpleReply || be32(rep[4:]) != 0 || be64(rep[8:]) != 42 {
		t.Fatalf("bad reply header % x", rep[:16])
	}

	ro, _, err := dialNegotiate(t, addr, "ro")
	if err != nil || ro.Flags&wire.FlagReadOnly == 0 {
		t.Errorf("ro export: %+v %v", ro, err)
	}
	_, _, err = dialNegotiate(t, addr, "nope")
	if !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("unknown export: got %v, want ErrUnknownExport", err)
	}
	if !strings.Contains(err.Error(), "nope") {
		t.Errorf("error does not name the export: %v", err)
	}
}

// TestNegotiatePeers runs the handshake against independent servers:
// nbdkit and qemu-nbd.
func TestNegotiatePeers(t *testing.T) {
	t.Run("nbdkit", func(t *testing.T) {
		bin := testenv.RequireTool(t, "nbdkit")
		port := freePort(t)
		cmd := exec.Command(bin, "-f", "-i", "127.0.0.1", "-p", strconv.Itoa(port), "-e", "vol0", "memory", "32M")
		startProc(t, cmd)
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		waitListen(t, addr)
		e, _, err := dialNegotiate(t, addr, "vol0")
		if err != nil {
			t.Fatal(err)
		}
		if e.Size != 32<<20 || e.Flags&wire.FlagCanMultiConn == 0 {
			t.Errorf("nbdkit export %+v", e)
		}
	})
	t.Run("qemu-nbd", func(t *testing.T) {
		bin := testenv.RequireTool(t, "qemu-nbd")
		img := t.TempDir() + "/img"
		if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		port := freePort(t)
		cmd := exec.Command(bin, "-f", "raw", "-t", "--shared=8", "-b", "127.0.0.1", "-p", strconv.Itoa(port), "-x", "disk", img)
		startProc(t, cmd)
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		waitListen(t, addr)
		e, _, err := dialNegotiate(t, addr, "disk")
		if err != nil {
			t.Fatal(err)
		}
		if e.Size != 1<<20 {
			t.Errorf("qemu-nbd export %+v", e)
		}
		if _, _, err := dialNegotiate(t, addr, "other"); !errors.Is(err, ErrUnknownExport) {
			t.Errorf("qemu-nbd unknown export: %v", err)
		}
	})
}

// TestNegotiateBadServers: a non-NBD peer and an oldstyle server fail with
// a clear error instead of hanging.
func TestNegotiateBadServers(t *testing.T) {
	for name, greeting := range map[string][]byte{
		"http":     []byte("HTTP/1.1 400 Bad Request\r\n\r\n"),
		"oldstyle": append([]byte("NBDMAGIC"), 0x00, 0x00, 0x42, 0x02, 0x81, 0x86, 0x12, 0x53, 0, 0),
	} {
		t.Run(name, func(t *testing.T) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			go func() {
				c, err := l.Accept()
				if err == nil {
					c.Write(greeting)
					time.Sleep(100 * time.Millisecond)
					c.Close()
				}
			}()
			_, _, err = dialNegotiate(t, l.Addr().String(), "vol0")
			if err == nil {
				t.Fatal("handshake with a bad server succeeded")
			}
			t.Logf("error: %v", err)
		})
	}
}

func TestParseDevice(t *testing.T) {
	for in, want := range map[string]int{"/dev/nbd0": 0, "nbd12": 12, "3": 3, "/dev/sda": -1, "/dev/nbd": -1, "/dev/nbd-1": -1} {
		got, err := ParseDevice(in)
		if got != want || (want < 0) != (err != nil) {
			t.Errorf("ParseDevice(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
}

// TestAttachErrors checks the errors a user meets first on a host without
// the driver (this test host) or without root.
func TestAttachErrors(t *testing.T) {
	_, err := Attach(context.Background(), Options{Volume: "vol0", Index: -1, Resolve: func(context.Context) (string, error) { return "127.0.0.1:1", nil }})
	if err == nil {
		t.Skip("this host has the nbd driver; the VM tests cover attach")
	}
	if os.Geteuid() != 0 {
		if !errors.Is(err, ErrNotRoot) {
			t.Fatalf("non-root attach: %v, want ErrNotRoot", err)
		}
		return
	}
	if _, statErr := os.Stat("/sys/module/nbd"); statErr != nil && !errors.Is(err, ErrNoModule) {
		t.Fatalf("attach without the nbd module: %v, want ErrNoModule", err)
	}
	t.Logf("attach error: %v", err)
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func startProc(t *testing.T, cmd *exec.Cmd) {
	var out strings.Builder
	var mu sync.Mutex
	w := writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return out.Write(p) })
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			mu.Lock()
			t.Logf("%s output:\n%s", cmd.Path, out.String())
			mu.Unlock()
		}
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func waitListen(t *testing.T, addr string) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s never listened", addr)
}

func putBE16(b []byte, v uint16) { b[0], b[1] = byte(v>>8), byte(v) }
func putBE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
}
func putBE64(b []byte, v uint64) { putBE32(b, uint32(v>>32)); putBE32(b[4:], uint32(v)) }
func be32(b []byte) uint32 {
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}
func be64(b []byte) uint64 { return uint64(be32(b))<<32 | uint64(be32(b[4:])) }
