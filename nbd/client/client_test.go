package client_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/nbd/client"
)

// startNBD serves vol over NBD on a fresh loopback port.
func startNBD(t *testing.T, vol blockdev.Device) (*nbd.Server, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nbd.StaticExports{{Name: "vol0", Device: vol}}, nbd.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	go srv.Serve(l)
	return srv, l.Addr().String()
}

// TestDeviceAgainstServer drives the ublk backend's NBD client against
// the real NBD server and engine: every operation, concurrent requests,
// errors mapped to blockdev sentinels, and a reconnect to a new address
// (the primary moved) with requests issued while the link was down.
func TestDeviceAgainstServer(t *testing.T) {
	vol, err := blockvol.Create(t.TempDir(), blockvol.Options{Size: 64 << 20, WALSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	srv, addr := startNBD(t, vol)
	var cur atomic.Value
	cur.Store(addr)
	resolve := func(context.Context) (string, error) { return cur.Load().(string), nil }
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	d, err := client.Dial(context.Background(), client.Options{Export: "vol0", Resolve: resolve, GiveUp: 30 * time.Second, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size() != 64<<20 {
		t.Fatalf("size %d", d.Size())
	}
	// Concurrent writes and reads of distinct blocks.
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			p := bytes.Repeat([]byte{byte(i + 1)}, 8192)
			if err := d.WriteAt(p, int64(i)*8192, i%2 == 0); err != nil {
				errs <- err
				return
			}
			got := make([]byte, 8192)
			if err := d.ReadAt(got, int64(i)*8192); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, p) {
				errs <- errors.New("read back different data")
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := d.Trim(0, 8192); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(8192, 8192, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 16384)
	if err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, make([]byte, 16384)) {
		t.Fatalf("trim/zero did not read back zeroes: %v", err)
	}
	// Out of range: an error wrapping a sentinel, not success.
	if err := d.ReadAt(make([]byte, 4096), 64<<20); err == nil || blockdev.Errno(err) == 0 {
		t.Fatalf("read past the end: %v", err)
	}

	// The primary moves: the old server goes away, a new one appears at
	// another address; a request issued meanwhile completes there.
	srv.Close()
	done := make(chan error, 1)
	go func() {
		p := bytes.Repeat([]byte{0xee}, 4096)
		done <- d.WriteAt(p, 1<<20, true)
	}()
	time.Sleep(100 * time.Millisecond) // let the write meet the dead link (not a correctness wait)
	srv2, addr2 := startNBD(t, vol)
	defer srv2.Close()
	cur.Store(addr2)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("write across the reconnect: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("write did not complete after the new server appeared")
	}
	b := make([]byte, 4096)
	if err := vol.ReadAt(b, 1<<20); err != nil || b[0] != 0xee {
		t.Fatalf("write not on the volume: %v %x", err, b[0])
	}
}

// TestDeviceGivesUp checks that without any server the device fails
// requests with EIO after give-up instead of hanging.
func TestDeviceGivesUp(t *testing.T) {
	vol, err := blockvol.Create(t.TempDir(), blockvol.Options{Size: 16 << 20, WALSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	srv, addr := startNBD(t, vol)
	resolve := func(context.Context) (string, error) { return addr, nil }
	d, err := client.Dial(context.Background(), client.Options{Export: "vol0", Resolve: resolve, GiveUp: 2 * time.Second, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	srv.Close()
	err = d.ReadAt(make([]byte, 4096), 0)
	if !errors.Is(err, blockdev.ErrIO) {
		t.Fatalf("read with no server: %v, want ErrIO", err)
	}
}

// TestDialWaitsForTheServer: with Wait, Dial keeps trying until the export
// is served; without it, one refused connection is the answer.
func TestDialWaitsForTheServer(t *testing.T) {
	vol, err := blockvol.Create(t.TempDir(), blockvol.Options{Size: 16 << 20, WALSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	resolve := func(context.Context) (string, error) { return addr, nil }
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := client.Dial(context.Background(), client.Options{Export: "vol0", Resolve: resolve, GiveUp: time.Second, Logger: log}); err == nil || !strings.Contains(err.Error(), addr) {
		t.Fatalf("dial with nothing listening: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		d, err := client.Dial(context.Background(), client.Options{Export: "vol0", Resolve: resolve, GiveUp: time.Second, Wait: time.Minute, Logger: log})
		if err == nil {
			d.Close()
		}
		done <- err
	}()
	time.Sleep(300 * time.Millisecond) // Dial is retrying a refused address
	l, err = net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := nbd.NewServer(nbd.StaticExports{{Name: "vol0", Device: vol}}, nbd.WithLogger(log))
	go srv.Serve(l)
	defer srv.Close()
	if err := <-done; err != nil {
		t.Fatalf("dial with Wait: %v", err)
	}
}
