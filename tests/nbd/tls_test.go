package nbdtests

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/nbd/client"
	"github.com/blockd/blockd/tlsauth"
)

// tlsInit runs `blockd tls init` into a fresh directory.
func tlsInit(t *testing.T, args ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "pki")
	if out, err := exec.Command(blockdBin, append([]string{"tls", "init", "--dir", dir}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("blockd tls init: %v\n%s", err, out)
	}
	return dir
}

// tlsServer is a `blockd serve` whose output goes to a file (read while
// it runs, so not to server.log's unsynchronised buffer).
type tlsServer struct {
	*server
	pki     string
	logPath string
}

func (s *tlsServer) logText() string {
	b, _ := os.ReadFile(s.logPath)
	return string(b)
}

// startTLSServer starts `blockd serve` with the certificate of server
// "local" from pki: NBD requires TLS and a client certificate of pki's CA.
func startTLSServer(t *testing.T, pki string) *tlsServer {
	t.Helper()
	s := &tlsServer{server: &server{t: t, dataDir: t.TempDir(), addr: freePort(t), apiAddr: freePort(t), log: &bytes.Buffer{}},
		pki: pki, logPath: filepath.Join(t.TempDir(), "serve.log")}
	s.launch()
	t.Cleanup(func() { s.stop() })
	return s
}

// launch starts the process on s's addresses and data, appending to its
// log, and waits until nbdinfo negotiates TLS with it.
func (s *tlsServer) launch() {
	t := s.t
	t.Helper()
	lf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	c := filepath.Join(s.pki, "servers", "local")
	s.cmd = exec.Command(blockdBin, "serve", "--log-file", "-", "--data", s.dataDir, "--nbd", s.addr, "--api", s.apiAddr,
		"--volume", fmt.Sprintf("vol0:%d", volSize),
		"--tls-cert", filepath.Join(c, "server-cert.pem"), "--tls-key", filepath.Join(c, "server-key.pem"), "--tls-ca", filepath.Join(c, "ca-cert.pem"))
	s.cmd.Stdout, s.cmd.Stderr = lf, lf
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.exited = make(chan struct{})
	go func(c *exec.Cmd, ch chan struct{}) { _ = c.Wait(); close(ch) }(s.cmd, s.exited)
	uri := fmt.Sprintf("nbds://%s/vol0?tls-certificates=%s", s.addr, filepath.Join(s.pki, "clients", "alice"))
	testenv.WaitFor(t, "blockd serve answers nbdinfo over TLS", 60*time.Second, func() error {
		select {
		case <-s.exited:
			t.Fatalf("server exited during start:\n%s", s.logText())
		default:
		}
		if out, err := runErr(t, 30*time.Second, "nbdinfo", "--size", uri); err != nil {
			return fmt.Errorf("%v: %s", err, strings.TrimSpace(out))
		}
		return nil
	})
}

// libnbdHome makes a home directory whose .pki/libnbd (libnbd's default
// certificate directory) holds the given CA, client certificate and key.
func libnbdHome(t *testing.T, caCert, clientDir string) string {
	t.Helper()
	home := t.TempDir()
	d := filepath.Join(home, ".pki", "libnbd")
	if err := os.MkdirAll(d, 0o700); err != nil {
		t.Fatal(err)
	}
	for dst, src := range map[string]string{"ca-cert.pem": caCert, "client-cert.pem": filepath.Join(clientDir, "client-cert.pem"),
		"client-key.pem": filepath.Join(clientDir, "client-key.pem")} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, dst), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return home
}

// fioTLS runs fio with libnbd's default certificate directory set to
// home/.pki/libnbd. fio's nbd engine cannot pass tls-certificates in its
// URI (libnbd refuses local file access in URIs unless the program calls
// nbd_set_uri_allow_local_file, which fio does not), so the certificates
// go where libnbd looks when none is set: $HOME/.pki/libnbd, or, when the
// effective uid is 0, only /etc/pki/libnbd. Rather than write to /etc, fio
// runs as root in a fresh user namespace (unshare --user): there its
// effective uid is the overflow uid, so libnbd takes HOME's directory,
// while file access still uses the real credentials.
func fioTLS(t *testing.T, home string, args ...string) (string, error) {
	t.Helper()
	fio := testenv.RequireTool(t, "fio")
	name, argv := fio, args
	if os.Geteuid() == 0 {
		name, argv = testenv.RequireTool(t, "unshare"), append([]string{"--user", fio}, args...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, argv...)
	cmd.Env = append(os.Environ(), "HOME="+home, "LIBNBD_DEBUG=0")
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("fio timed out: %w", err)
	}
	if err != nil && bytes.Contains(out, []byte("unshare failed")) {
		t.Fatalf("cannot make a user namespace for fio (libnbd ignores HOME as root):\n%s", out)
	}
	return string(out), err
}

// TestFioTLS: fio's nbd engine over TLS (nbds://) against a TLS-only
// `blockd serve`, two connections at QD32 with crc32c verify, read back
// by a second fio run; then the refusals fio meets: a plain nbd:// URI,
// a CA that did not sign the server (fio refuses the server), a client
// certificate of another CA (the server refuses fio). The server logs
// each refusal and keeps serving.
func TestFioTLS(t *testing.T) {
	testenv.RequireTool(t, "fio")
	pki := tlsInit(t, "--server", "local", "--client", "alice")
	s := startTLSServer(t, pki)
	alice := filepath.Join(pki, "clients", "alice")
	home := libnbdHome(t, filepath.Join(alice, "ca-cert.pem"), alice)
	uri := "--uri=nbds://" + s.addr + "/vol0"
	job := []string{"--name=tls", "--ioengine=nbd", uri, "--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=2",
		"--size=32m", "--offset_increment=32m", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0",
		"--group_reporting", "--output-format=json"}
	out, err := fioTLS(t, home, job...)
	if err != nil {
		t.Fatalf("fio over TLS: %v\n%s\nserver:\n%s", err, out, s.logText())
	}
	checkFio(t, out, true, true)
	if n := strings.Count(s.logText(), "msg=nbd_tls_established server=local"); n < 2 || !strings.Contains(s.logText(), "client=alice") {
		t.Fatalf("server log shows %d TLS sessions (want >= 2, client alice):\n%s", n, s.logText())
	}
	// A second process reads the blocks back and checks their checksums.
	out, err = fioTLS(t, home, append(job, "--verify_only")...)
	if err != nil {
		t.Fatalf("fio verify_only over TLS: %v\n%s", err, out)
	}
	checkFio(t, out, true, false)

	refused := func(what, out string, err error, want string) {
		t.Helper()
		if err == nil || !strings.Contains(out, want) {
			t.Fatalf("%s: err %v, want a refusal containing %q:\n%s", what, err, want, out)
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "fio: ") {
				t.Logf("refused: %s: %s", what, l)
			}
		}
	}
	plain := []string{"--name=plain", "--ioengine=nbd", "--rw=write", "--bs=4k", "--size=1m"}
	out, err = fioTLS(t, home, append(plain, "--uri=nbd://"+s.addr+"/vol0")...)
	refused("plain nbd:// at the TLS-only server", out, err, "server requires TLS")
	waitLog(t, s, "nbd_tls_required")

	// A CA that did not sign the server: fio (libnbd) refuses the server.
	other := tlsInit(t, "--server", "local", "--client", "alice")
	wrongCA := libnbdHome(t, filepath.Join(other, "ca-cert.pem"), alice)
	out, err = fioTLS(t, wrongCA, append(plain, uri)...)
	refused("fio trusting another CA", out, err, "certificate verification")

	// A client certificate of another CA: the server refuses fio.
	stranger := libnbdHome(t, filepath.Join(alice, "ca-cert.pem"), filepath.Join(other, "clients", "alice"))
	out, err = fioTLS(t, stranger, append(plain, uri)...)
	refused("fio with another CA's client certificate", out, err, "nbd_connect_uri")
	waitLog(t, s, "client certificate rejected: x509: certificate signed by unknown authority")

	// Undisturbed: the first blocks still verify.
	out, err = fioTLS(t, home, append(job, "--verify_only")...)
	if err != nil {
		t.Fatalf("fio verify_only after the refusals: %v\n%s", err, out)
	}
	checkFio(t, out, true, false)
}

func waitLog(t *testing.T, s *tlsServer, want string) {
	t.Helper()
	testenv.WaitFor(t, "server log: "+want, 20*time.Second, func() error {
		if !strings.Contains(s.logText(), want) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
}

// TestTLSClientReconnect: blockd's userspace NBD client (the backend of
// `attach ublk`) over TLS keeps its device across a kill -9 and restart
// of blockd serve: every reconnect negotiates STARTTLS and a new TLS
// session with its client certificate, and the data written before and
// after reads back.
func TestTLSClientReconnect(t *testing.T) {
	pki := tlsInit(t, "--server", "local", "--client", "alice")
	s := startTLSServer(t, pki)
	a := filepath.Join(pki, "clients", "alice")
	alice, err := tlsauth.Load(filepath.Join(a, "client-cert.pem"), filepath.Join(a, "client-key.pem"), filepath.Join(a, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedLog{}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dev, err := client.Dial(ctx, client.Options{Export: "vol0", Wait: 10 * time.Second, GiveUp: 2 * time.Minute,
		Resolve: func(context.Context) (string, error) { return s.addr, nil },
		TLS:     alice.ClientConfig(tlsauth.Expect(tlsauth.KindServer, "local")),
		Logger:  slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatalf("dial over TLS: %v\n%s", err, s.logText())
	}
	defer dev.Close()
	before, after := bytes.Repeat([]byte{0x5a}, 64<<10), bytes.Repeat([]byte{0xa5}, 64<<10)
	if err := dev.WriteAt(before, 0, true); err != nil {
		t.Fatal(err)
	}
	sessions := func() int { return strings.Count(s.logText(), "msg=nbd_tls_established server=local") }
	n0 := sessions()
	s.kill9()
	done := make(chan error, 1)
	go func() { done <- dev.WriteAt(after, 1<<20, true) }() // blocks until the device has reconnected
	time.Sleep(500 * time.Millisecond)
	s.launch()
	if err := <-done; err != nil {
		t.Fatalf("write across the restart: %v\nclient:\n%s", err, logs)
	}
	if !strings.Contains(logs.String(), "ublk_nbd_reconnected") {
		t.Fatalf("the client did not reconnect:\n%s", logs)
	}
	if n := sessions(); n <= n0 {
		t.Fatalf("no new TLS session after the restart (%d before, %d after):\n%s", n0, n, s.logText())
	}
	got := make([]byte, 64<<10)
	for _, w := range []struct {
		off  int64
		want []byte
	}{{0, before}, {1 << 20, after}} {
		if err := dev.ReadAt(got, w.off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, w.want) {
			t.Fatalf("data at %d after the reconnect differs", w.off)
		}
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

// TestServeInsecure: without credentials `blockd serve` refuses a
// non-loopback NBD address, naming the cure; with --insecure it serves
// plain NBD there and prints a warning.
func TestServeInsecure(t *testing.T) {
	_, port, _ := strings.Cut(freePort(t), ":")
	args := []string{"serve", "--log-file", "-", "--data", t.TempDir(), "--nbd", "0.0.0.0:" + port, "--api", freePort(t),
		"--volume", "vol0:64MiB"}
	out, err := exec.Command(blockdBin, args...).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "binds a non-loopback address without TLS") || !strings.Contains(string(out), "--insecure") {
		t.Fatalf("serve on 0.0.0.0 without TLS: %v\n%s", err, out)
	}
	t.Logf("refused: %s", strings.TrimSpace(string(out)))

	s := &tlsServer{server: &server{t: t, log: &bytes.Buffer{}}, logPath: filepath.Join(t.TempDir(), "serve.log")}
	lf, err := os.Create(s.logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	s.cmd = exec.Command(blockdBin, append(args, "--insecure")...)
	s.cmd.Stdout, s.cmd.Stderr = lf, lf
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.exited = make(chan struct{})
	go func(c *exec.Cmd, ch chan struct{}) { _ = c.Wait(); close(ch) }(s.cmd, s.exited)
	t.Cleanup(func() { s.stop() })
	testenv.WaitFor(t, "plain nbdinfo at 0.0.0.0 with --insecure", 60*time.Second, func() error {
		select {
		case <-s.exited:
			t.Fatalf("serve --insecure exited:\n%s", s.logText())
		default:
		}
		if out, err := runErr(t, 30*time.Second, "nbdinfo", "--size", "nbd://127.0.0.1:"+port+"/vol0"); err != nil {
			return fmt.Errorf("%v: %s", err, strings.TrimSpace(out))
		}
		return nil
	})
	if !strings.Contains(s.logText(), "WARNING: serve: --nbd 0.0.0.0:"+port+" without TLS (--insecure)") {
		t.Fatalf("no warning for serving in the clear:\n%s", s.logText())
	}
}
