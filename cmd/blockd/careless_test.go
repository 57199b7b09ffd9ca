package main

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

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/master"
)

// Careless input (issue 18): every case fails with one line that names its
// cause. The CLI runs in process, as main runs it, against real sockets.

// runCLI runs `blockd args...` and returns its standard output and error.
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	app := newApp()
	var out, errOut bytes.Buffer
	app.Writer, app.ErrWriter = &out, &errOut
	start := time.Now()
	err := run(app, append([]string{"blockd"}, args...))
	t.Logf("blockd %s: %v in %v", clipArgs(args), err, time.Since(start).Round(time.Millisecond))
	return out.String(), err
}

func clipArgs(args []string) string {
	s := strings.Join(args, " ")
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// refusingAddr is a loopback address where nothing listens.
func refusingAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// silentListener accepts connections and never answers; it counts them.
func silentListener(t *testing.T) (string, *atomic.Int32) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int32
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return l.Addr().String(), &n
}

func mustOneLine(t *testing.T, err error, want ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want one naming %q", want)
	}
	msg := err.Error()
	if strings.Contains(msg, "\n") {
		t.Errorf("error spans lines: %q", msg)
	}
	for _, w := range want {
		if !strings.Contains(msg, w) {
			t.Errorf("error %q does not say %q", msg, w)
		}
	}
	if len(msg) > 400 {
		t.Errorf("error of %d bytes: %.200q...", len(msg), msg)
	}
}

func TestUnreachableMasterIsOneLine(t *testing.T) {
	refused := refusingAddr(t)
	silent, accepts := silentListener(t)

	_, err := runCLI(t, "volume", "list", "--master", refused)
	mustOneLine(t, err, refused, "refused the connection", "--wait")

	_, err = runCLI(t, "volume", "list", "--master", silent)
	mustOneLine(t, err, silent, "accepted the connection but sent no reply within 3s", "--wait")
	if strings.Contains(err.Error(), "context deadline exceeded") {
		t.Errorf("error names the context, not the master: %v", err)
	}
	// One answer timeout, not a retry loop for the old 30s.
	if n := accepts.Load(); n != 1 {
		t.Errorf("the silent master was tried %d times with the default --wait, want 1", n)
	}

	// Both kinds, as a comma-separated list: each address with its outcome.
	_, err = runCLI(t, "volume", "info", "vol0", "--master", refused+","+silent, "--timeout", "500ms")
	mustOneLine(t, err, refused+" refused the connection", silent+" accepted the connection but sent no reply within 500ms")

	// A connection closed at once is named too.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, err = runCLI(t, "volume", "list", "--master", l.Addr().String(), "--wait", "0")
	mustOneLine(t, err, l.Addr().String()+" closed the connection without a reply")
}

// TestWaitWaitsForAMaster: --wait keeps trying while the master starts.
func TestWaitWaitsForAMaster(t *testing.T) {
	addr := refusingAddr(t)
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := runCLI(t, "volume", "list", "--master", addr, "--wait", "60s", "-o", "json")
		done <- result{out, err}
	}()
	time.Sleep(500 * time.Millisecond) // the CLI is retrying a refused address
	select {
	case r := <-done:
		t.Fatalf("volume list --wait 60s returned before a master existed: %q %v", r.out, r.err)
	default:
	}
	m, err := master.Start(master.Config{DataDir: t.TempDir(), APIAddr: addr, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	r := <-done
	if r.err != nil {
		t.Fatalf("volume list --wait 60s: %v", r.err)
	}
	if strings.TrimSpace(r.out) != "[]" {
		t.Fatalf("output %q, want []", r.out)
	}
}

func TestBadSizeNamesFlagValueAndForms(t *testing.T) {
	master := refusingAddr(t) // nothing must be sent
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"volume", "create", "v1", "--size", "banana"}, `--size "banana": not a size; use a number of bytes or a number with a unit: 4096, 512MiB, 10GiB`},
		{[]string{"volume", "create", "v1", "--size", "-5GiB"}, `--size "-5GiB": a size cannot be negative; use a number of bytes`},
		{[]string{"volume", "create", "v1", "--size", "0"}, `--size "0": a size must be more than 0`},
		{[]string{"volume", "create", "v1", "--size", "1GiB", "--wal-size", "lots"}, `--wal-size "lots": not a size`},
		{[]string{"volume", "expand", "v1", "--size", "-1"}, `--size "-1": a size cannot be negative`},
		{[]string{"volume", "plan", "--size", "9EiB"}, `--size "9EiB": too large`},
	} {
		_, err := runCLI(t, append(c.args, "--master", master)...)
		mustOneLine(t, err, c.want)
		if strings.Contains(err.Error(), "strconv") || strings.Contains(err.Error(), master) {
			t.Errorf("%v: %v", c.args, err)
		}
	}
}

func TestExplicitZeroRFIsRefused(t *testing.T) {
	master := refusingAddr(t)
	for _, rf := range []string{"0", "-1"} {
		_, err := runCLI(t, "volume", "create", "v1", "--size", "1GiB", "--rf", rf, "--master", master)
		mustOneLine(t, err, "--rf "+rf+": the replication factor counts copies", "leave --rf out for the preset's")
		if strings.Contains(err.Error(), master) {
			t.Errorf("--rf %s was sent to the master: %v", rf, err)
		}
	}
}

func TestServeBadVolumeFailsAtOnce(t *testing.T) {
	// The API address is taken: had serve started anything, it would fail
	// on that instead of on the name.
	busy, _ := silentListener(t)
	for _, c := range []struct{ spec, want string }{
		{"bad/name:1GiB", `--volume: invalid volume name "bad/name": ` + api.VolumeNameRule},
		{"vol0:banana", `--volume size "banana": not a size`},
		{"vol0:-5GiB", `--volume size "-5GiB": a size cannot be negative`},
		{"vol0", `--volume "vol0": want NAME:SIZE`},
	} {
		_, err := runCLI(t, "serve", "--data", t.TempDir(), "--api", busy, "--nbd", refusingAddr(t), "--volume", c.spec)
		mustOneLine(t, err, c.want)
	}
}

func TestLongNameIsNotEchoedWhole(t *testing.T) {
	long := strings.Repeat("a", 10000)
	master := refusingAddr(t)
	for _, args := range [][]string{
		{"volume", "info", long},
		{"volume", "delete", long},
		{"volume", "create", long, "--size", "1GiB"},
		{"serve", "--data", t.TempDir(), "--volume", long + ":1GiB"},
		{"attach", "nbd", long},
		{"attach", "ublk", long},
		{"volume", "list", "-o", long},
	} {
		_, err := runCLI(t, append(args, "--master", master)...)
		if args[0] == "serve" {
			_, err = runCLI(t, args...)
		}
		want := "invalid volume name"
		if args[1] == "list" {
			want = "unknown output format"
		}
		mustOneLine(t, err, want, "(10000 bytes)")
	}
}

// TestClientClipsAMasterEcho: the master (not the CLI) echoing a long name
// in its message is cut short by the client too.
func TestClientClipsAMasterEcho(t *testing.T) {
	m, err := master.Start(master.Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := m.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	_, err = c.VolumeInfo(ctx, strings.Repeat("b", 10000))
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.CodeNotFound {
		t.Fatalf("err = %v", err)
	}
	// Clipped by the master ("(10000 bytes)") or, for a master that echoes
	// it whole, by the client ("10002 bytes": the quoted word).
	if len(err.Error()) > 300 || !(strings.Contains(err.Error(), "10002 bytes") || strings.Contains(err.Error(), "(10000 bytes)")) {
		t.Fatalf("error of %d bytes: %.300s", len(err.Error()), err)
	}
}

func TestBadMasterAddress(t *testing.T) {
	for _, m := range []string{"a b", "http://", "127.0.0.1:99999", "127.0.0.1", ",", "ftp://127.0.0.1:9333", "127.0.0.1:0"} {
		_, err := runCLI(t, "volume", "list", "--master", m)
		mustOneLine(t, err, "--master "+api.QuoteName(strings.TrimSpace(m)))
	}
	for _, m := range []string{"127.0.0.1:1", "http://127.0.0.1:1/", "[::1]:1", "localhost:1,127.0.0.1:2"} {
		if _, err := masterAddrs(m); err != nil {
			t.Errorf("--master %s: %v", m, err)
		}
	}
	_, err := runCLI(t, "attach", "nbd", "vol0", "--master", "a b")
	mustOneLine(t, err, "attach nbd: --master")
}
