package nbd

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/nbd/wire"
	"github.com/blockd/blockd/tlsauth"
)

// logBuf is a concurrency-safe log sink tests match refusals in.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitLog waits until the server log contains s.
func (l *logBuf) waitLog(t *testing.T, s string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(l.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("server log lacks %q:\n%s", s, l.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type tlsFixture struct {
	dir   string // tls init output
	ts    *testServer
	log   *logBuf
	alice *tlsauth.Creds
}

// credDir is DIR/clients/NAME (the layout libnbd and qemu take).
func (f *tlsFixture) credDir(name string) string { return filepath.Join(f.dir, "clients", name) }

func startTLS(t *testing.T, opts ...Option) *tlsFixture {
	t.Helper()
	dir := t.TempDir()
	if _, err := tlsauth.Init(dir, tlsauth.InitOptions{Servers: []string{"s1"}, Clients: []string{"alice", "bob"}}); err != nil {
		t.Fatal(err)
	}
	sd := filepath.Join(dir, "servers", "s1")
	srvCreds, err := tlsauth.Load(filepath.Join(sd, "server-cert.pem"), filepath.Join(sd, "server-key.pem"), filepath.Join(sd, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	cd := filepath.Join(dir, "clients", "alice")
	alice, err := tlsauth.Load(filepath.Join(cd, "client-cert.pem"), filepath.Join(cd, "client-key.pem"), filepath.Join(cd, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	lb := &logBuf{}
	dev := newMemDev(testSize)
	opts = append([]Option{WithTLS(srvCreds.ServerConfig(nil)), WithLogger(slog.New(slog.NewTextHandler(lb, nil)))}, opts...)
	// "acl" admits alice read-only and nobody else.
	acl := func(client string) (bool, error) {
		if client == "alice" {
			return true, nil
		}
		return false, fmt.Errorf("client %q is not on the allow list of volume acl", client)
	}
	ts := startServer(t, StaticExports{{Name: "vol0", Device: dev}, {Name: "acl", Device: dev, Access: acl}}, opts...)
	ts.dev = dev
	return &tlsFixture{dir: dir, ts: ts, log: lb, alice: alice}
}

// upgrade sends STARTTLS on rc and switches it to TLS with cfg.
func (rc *rawClient) upgrade(cfg *tls.Config) error {
	rc.t.Helper()
	rc.sendOpt(wire.OptStartTLS, nil)
	if r := rc.readOptReply(); r.opt != wire.OptStartTLS || r.typ != wire.RepAck {
		rc.t.Fatalf("STARTTLS: reply %#x %q", r.typ, r.data)
	}
	tc := tls.Client(rc.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return err
	}
	rc.nc, rc.br = tc, bufio.NewReader(tc)
	return nil
}

func TestTLSRequiredOptions(t *testing.T) {
	f := startTLS(t)
	rc := dialRaw(t, "tcp", f.ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	// Before STARTTLS: everything but ABORT gets TLS_REQD and negotiation goes on.
	for _, opt := range []uint32{wire.OptList, wire.OptStructuredReply, 99} {
		rc.sendOpt(opt, nil)
		if r := rc.readOptReply(); r.typ != wire.RepErrTLSReqd {
			t.Fatalf("option %d before STARTTLS: reply %#x %q, want TLS_REQD", opt, r.typ, r.data)
		}
	}
	if gi := rc.info(wire.OptGo, "vol0"); gi.errType != wire.RepErrTLSReqd || !strings.Contains(gi.errMsg, "STARTTLS") {
		t.Fatalf("OPT_GO before STARTTLS: %#x %q", gi.errType, gi.errMsg)
	}
	rc.sendOpt(wire.OptStartTLS, []byte("x"))
	if r := rc.readOptReply(); r.typ != wire.RepErrInvalid {
		t.Fatalf("STARTTLS with data: %#x", r.typ)
	}
	if err := rc.upgrade(f.alice.ClientConfig(tlsauth.Expect(tlsauth.KindServer, "s1"))); err != nil {
		t.Fatal(err)
	}
	rc.sendOpt(wire.OptStartTLS, nil)
	if r := rc.readOptReply(); r.typ != wire.RepErrInvalid || !strings.Contains(string(r.data), "already") {
		t.Fatalf("second STARTTLS: %#x %q", r.typ, r.data)
	}
	gi := rc.info(wire.OptGo, "vol0")
	if gi.errType != 0 || gi.size != testSize {
		t.Fatalf("OPT_GO over TLS: %+v", gi)
	}
	p := pattern(8192, 3)
	rc.request(wire.CmdWrite, 0, 1, 4096, 8192, p)
	if r := rc.readReply(); r.errno != 0 {
		t.Fatalf("write over TLS: errno %d", r.errno)
	}
	f.log.waitLog(t, "tls_required")
	f.log.waitLog(t, "tls_established")

	// ABORT before STARTTLS is answered; EXPORT_NAME ends the session.
	rc2 := dialRaw(t, "tcp", f.ts.addr)
	rc2.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	rc2.sendOpt(wire.OptAbort, nil)
	if r := rc2.readOptReply(); r.typ != wire.RepAck {
		t.Fatalf("ABORT before STARTTLS: %#x", r.typ)
	}
	rc3 := dialRaw(t, "tcp", f.ts.addr)
	rc3.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	rc3.sendOpt(wire.OptExportName, []byte("vol0"))
	rc3.expectClosed()
	f.log.waitLog(t, "NBD_OPT_EXPORT_NAME without NBD_OPT_STARTTLS")
}

// TestTLSRefusals: a client without a certificate, garbage instead of a
// ClientHello, a stalled handshake and data pipelined after STARTTLS are
// each refused and logged, while an established client goes on working.
func TestTLSRefusals(t *testing.T) {
	f := startTLS(t, WithHandshakeTimeout(2*time.Second))
	good := dialRaw(t, "tcp", f.ts.addr)
	good.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	if err := good.upgrade(f.alice.ClientConfig(nil)); err != nil {
		t.Fatal(err)
	}
	if gi := good.info(wire.OptGo, "vol0"); gi.errType != 0 {
		t.Fatalf("good client: %+v", gi)
	}
	check := func(what string) {
		t.Helper()
		good.request(wire.CmdRead, 0, 7, 0, 4096, nil)
		if r := good.readReply(); r.errno != 0 {
			t.Fatalf("established client after %s: errno %d", what, r.errno)
		}
	}

	// No client certificate.
	rc := dialRaw(t, "tcp", f.ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	noCert := f.alice.ClientConfig(nil)
	noCert.Certificates = nil
	err := rc.upgrade(noCert)
	if err == nil { // TLS 1.3: the refusal arrives with the first read
		_, err = rc.tryReadReply()
	}
	if err == nil {
		t.Fatal("handshake without a client certificate succeeded")
	}
	t.Logf("no client certificate, client side: %v", err)
	f.log.waitLog(t, "tls_refused")
	check("no certificate")

	// Garbage instead of a ClientHello.
	rc = dialRaw(t, "tcp", f.ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	rc.sendOpt(wire.OptStartTLS, nil)
	if r := rc.readOptReply(); r.typ != wire.RepAck {
		t.Fatalf("STARTTLS: %#x", r.typ)
	}
	rc.write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	rc.expectClosed()
	f.log.waitLog(t, "not a TLS ClientHello")
	check("garbage")

	// A stalled handshake: STARTTLS acknowledged, then nothing.
	rc = dialRaw(t, "tcp", f.ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	rc.sendOpt(wire.OptStartTLS, nil)
	if r := rc.readOptReply(); r.typ != wire.RepAck {
		t.Fatalf("STARTTLS: %#x", r.typ)
	}
	rc.expectClosed()
	f.log.waitLog(t, "did not complete in time")
	check("stall")

	// Data pipelined after STARTTLS (a plaintext injection attempt).
	rc = dialRaw(t, "tcp", f.ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	b := fuzzSeed(false, [][2]any{{wire.OptStartTLS, []byte(nil)}, {wire.OptGo, goData("vol0")}})[4:]
	rc.write(b)
	rc.expectClosed()
	f.log.waitLog(t, "data pipelined after NBD_OPT_STARTTLS")
	check("pipelining")
	deadline := time.Now().Add(20 * time.Second)
	for f.ts.srv.Conns() != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections open, want only the good one", f.ts.srv.Conns())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// writeCreds writes a client credentials directory (libnbd/qemu layout).
func writeCreds(t *testing.T, dir string, ca []byte, leaf tlsauth.Leaf) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"ca-cert.pem": ca, "client-cert.pem": leaf.CertPEM, "client-key.pem": leaf.KeyPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func runTool(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// TestTLSRealClients: libnbd's nbdinfo, qemu-img and qemu-io over
// TLS with the certificates blockd tls init writes, and the refusals they
// meet: a plain client, a certificate from another CA, an expired one.
func TestTLSRealClients(t *testing.T) {
	f := startTLS(t)
	nbdinfo := testenv.RequireTool(t, "nbdinfo")
	qemuImg := testenv.RequireTool(t, "qemu-img")
	qemuIO := testenv.RequireTool(t, "qemu-io")
	host, port, _ := strings.Cut(f.ts.addr, ":")
	uri := func(dir string) string { return fmt.Sprintf("nbds://%s/vol0?tls-certificates=%s", f.ts.addr, dir) }

	out, err := runTool(t, nbdinfo, uri(f.credDir("alice")))
	if err != nil || !strings.Contains(out, "with TLS") {
		t.Fatalf("nbdinfo over TLS: %v\n%s", err, out)
	}
	obj := "tls-creds-x509,id=tls0,endpoint=client,dir=" + f.credDir("alice")
	img := fmt.Sprintf("driver=nbd,host=%s,port=%s,export=vol0,tls-creds=tls0", host, port)
	if out, err := runTool(t, qemuIO, "--object", obj, "--image-opts", img,
		"-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", "-c", "flush"); err != nil || strings.Contains(out, "fail") {
		t.Fatalf("qemu-io over TLS: %v\n%s", err, out)
	}
	if out, err := runTool(t, qemuImg, "info", "--object", obj, "--image-opts", img); err != nil || !strings.Contains(out, "64 MiB") {
		t.Fatalf("qemu-img info over TLS: %v\n%s", err, out)
	}
	// fio's nbd engine over TLS (its certificates in libnbd's default
	// directory) is run against blockd serve in tests/nbd (TestFioTLS).

	// Refusals. A plain client against the TLS-only server.
	out, err = runTool(t, nbdinfo, "nbd://"+f.ts.addr+"/vol0")
	if err == nil {
		t.Fatalf("plain nbdinfo was served:\n%s", out)
	}
	t.Logf("plain nbdinfo: %s", strings.TrimSpace(out))
	out, err = runTool(t, qemuImg, "info", "nbd://"+f.ts.addr+"/vol0")
	if err == nil || !strings.Contains(out, "TLS required") {
		t.Fatalf("plain qemu-img: %v\n%s", err, out)
	}
	t.Logf("plain qemu-img: %s", strings.TrimSpace(out))
	f.log.waitLog(t, "tls_required")

	// A certificate from another cluster's CA (it trusts our CA, so the
	// server is the one refusing).
	other := t.TempDir()
	if _, err := tlsauth.Init(other, tlsauth.InitOptions{Clients: []string{"mallory"}}); err != nil {
		t.Fatal(err)
	}
	ourCA, err := os.ReadFile(filepath.Join(f.dir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	mal := filepath.Join(other, "clients", "mallory")
	if err := os.WriteFile(filepath.Join(mal, "ca-cert.pem"), ourCA, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = runTool(t, nbdinfo, uri(mal))
	if err == nil {
		t.Fatalf("client with another CA's certificate was served:\n%s", out)
	}
	t.Logf("wrong CA, client side: %s", strings.TrimSpace(out))
	f.log.waitLog(t, "certificate signed by unknown authority")

	// An expired certificate from the right CA.
	ca, err := tlsauth.LoadCA(f.dir)
	if err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-72 * time.Hour)
	leaf, err := ca.Issue(tlsauth.Identity{Kind: tlsauth.KindClient, Name: "old"}, nil, past, past.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	oldDir := filepath.Join(t.TempDir(), "old")
	writeCreds(t, oldDir, ourCA, leaf)
	out, err = runTool(t, qemuImg, "info", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+oldDir, "--image-opts", img)
	if err == nil {
		t.Fatalf("expired certificate was served:\n%s", out)
	}
	// qemu refuses its own expired certificate before connecting; the
	// server's check is seen with a client that sends it anyway.
	t.Logf("expired certificate, qemu-img: %s", strings.TrimSpace(out))
	expired, err := tls.X509KeyPair(leaf.CertPEM, leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.alice.ClientConfig(nil)
	cfg.Certificates = []tls.Certificate{expired}
	rc := dialRaw(t, "tcp", f.ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	err = rc.upgrade(cfg)
	if err == nil { // TLS 1.3: the refusal arrives with the first read
		_, err = rc.tryReadReply()
	}
	if err == nil {
		t.Fatal("expired client certificate accepted")
	}
	t.Logf("expired certificate, Go client: %v", err)
	f.log.waitLog(t, "certificate has expired")
}

// TestTLSAccess: Export.Access is asked with the certificate's name at
// OPT_GO: alice is served read-only (a write fails with EPERM), bob is
// refused with NBD_REP_ERR_POLICY and the reason, and the refusal is
// logged; negotiation goes on after the refusal.
func TestTLSAccess(t *testing.T) {
	f := startTLS(t)
	bobDir := f.credDir("bob")
	bob, err := tlsauth.Load(filepath.Join(bobDir, "client-cert.pem"), filepath.Join(bobDir, "client-key.pem"), filepath.Join(bobDir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	rc := dialRaw(t, "tcp", f.ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	if err := rc.upgrade(bob.ClientConfig(nil)); err != nil {
		t.Fatal(err)
	}
	gi := rc.info(wire.OptGo, "acl")
	if gi.errType != wire.RepErrPolicy || !strings.Contains(gi.errMsg, `client "bob" is not on the allow list`) {
		t.Fatalf("bob at acl: %#x %q", gi.errType, gi.errMsg)
	}
	f.log.waitLog(t, "access_refused")
	if gi := rc.info(wire.OptGo, "vol0"); gi.errType != 0 {
		t.Fatalf("bob at vol0 after the refusal: %#x %q", gi.errType, gi.errMsg)
	}

	rc = dialRaw(t, "tcp", f.ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	if err := rc.upgrade(f.alice.ClientConfig(nil)); err != nil {
		t.Fatal(err)
	}
	gi = rc.info(wire.OptGo, "acl")
	if gi.errType != 0 || gi.flags&wire.FlagReadOnly == 0 {
		t.Fatalf("alice at acl: %+v", gi)
	}
	rc.request(wire.CmdWrite, 0, 1, 0, 4096, make([]byte, 4096))
	if r := rc.readReply(); r.errno != uint32(syscall.EPERM) {
		t.Fatalf("alice's write to a read-only grant: errno %d", r.errno)
	}

	// Without TLS there is no name: a plain server refuses such an export.
	ts := startServer(t, StaticExports{{Name: "acl", Device: newMemDev(1 << 20), Access: func(c string) (bool, error) {
		if c == "" {
			return false, fmt.Errorf("volume acl has an allow list: connect with a client certificate")
		}
		return false, nil
	}}})
	rc = dialRaw(t, "tcp", ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	if gi := rc.info(wire.OptGo, "acl"); gi.errType != wire.RepErrPolicy {
		t.Fatalf("plain client at an export with an allow list: %#x", gi.errType)
	}
}
