package tlsauth

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func initDir(t *testing.T, o InitOptions) string {
	t.Helper()
	dir := t.TempDir()
	if _, err := Init(dir, o); err != nil {
		t.Fatal(err)
	}
	return dir
}

func load(t *testing.T, dir string, id Identity) *Creds {
	t.Helper()
	d := entityDir(dir, id)
	p := "server"
	if id.Kind == KindClient {
		p = "client"
	}
	c, err := Load(filepath.Join(d, p+"-cert.pem"), filepath.Join(d, p+"-key.pem"), filepath.Join(d, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// handshake runs a server and a client handshake over a real TCP socket
// and returns both sides' errors.
func handshake(t *testing.T, srv, cli *tls.Config) (serr, cerr error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tl := NewListener(ln, srv)
	ch := make(chan error, 1)
	go func() {
		c, err := tl.Accept()
		if err != nil {
			ch <- err
			return
		}
		defer c.Close()
		err = c.(*Conn).Handshake()
		if err == nil {
			_, err = c.Write([]byte("x"))
		}
		ch <- err
	}()
	tc, cerr := Dial(context.Background(), &net.Dialer{}, ln.Addr().String(), cli)
	if cerr == nil {
		var b [1]byte
		_, cerr = tc.Read(b[:])
		tc.Close()
	}
	return <-ch, cerr
}

func TestInitLayoutAndIdentity(t *testing.T) {
	dir := initDir(t, InitOptions{Masters: []string{"m1"}, Servers: []string{"s1"}, Clients: []string{"alice"}})
	for _, f := range []string{"ca-cert.pem", "ca-key.pem", "masters/m1/server-cert.pem", "masters/m1/server-key.pem", "masters/m1/ca-cert.pem",
		"servers/s1/server-cert.pem", "servers/s1/server-key.pem", "servers/s1/ca-cert.pem",
		"clients/alice/client-cert.pem", "clients/alice/client-key.pem", "clients/alice/ca-cert.pem"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("missing %s: %v", f, err)
		}
	}
	if st, _ := os.Stat(filepath.Join(dir, "clients/alice/client-key.pem")); st.Mode().Perm() != 0o600 {
		t.Errorf("client key mode %v, want 0600", st.Mode().Perm())
	}
	s1 := load(t, dir, Identity{KindServer, "s1"})
	if s1.ID != (Identity{KindServer, "s1"}) || s1.Leaf.Subject.CommonName != "s1" {
		t.Fatalf("identity %v CN %q", s1.ID, s1.Leaf.Subject.CommonName)
	}
	// A second init reuses the CA and refuses to overwrite.
	if _, err := Init(dir, InitOptions{Servers: []string{"s2"}}); err != nil {
		t.Fatal(err)
	}
	s2 := load(t, dir, Identity{KindServer, "s2"})
	if string(s2.Leaf.RawIssuer) != string(s1.Leaf.RawIssuer) || s2.Leaf.CheckSignatureFrom(mustCA(t, dir)) != nil {
		t.Fatal("second init made a new CA")
	}
	if _, err := Init(dir, InitOptions{Servers: []string{"s1"}}); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Fatalf("re-issuing s1: %v", err)
	}
	if _, err := Init(dir, InitOptions{Clients: []string{"../x"}}); err == nil {
		t.Fatal("bad name accepted")
	}
}

func TestMutualTLS(t *testing.T) {
	dir := initDir(t, InitOptions{Servers: []string{"s1", "s2"}, Clients: []string{"alice"}})
	s1 := load(t, dir, Identity{KindServer, "s1"})
	s2 := load(t, dir, Identity{KindServer, "s2"})
	alice := load(t, dir, Identity{KindClient, "alice"})

	if serr, cerr := handshake(t, s1.ServerConfig(nil), alice.ClientConfig(Expect(KindServer, "s1"))); serr != nil || cerr != nil {
		t.Fatalf("good handshake: server %v, client %v", serr, cerr)
	}
	// The client expects s2 at this address; s1 answers.
	_, cerr := handshake(t, s1.ServerConfig(nil), alice.ClientConfig(Expect(KindServer, "s2")))
	if cerr == nil || !strings.Contains(cerr.Error(), "peer certificate is for server s1, want server s2") {
		t.Fatalf("wrong server ID: %v", cerr)
	}
	// The server accepts only servers: a client is refused.
	serr, _ := handshake(t, s1.ServerConfig(Expect(KindServer, "")), alice.ClientConfig(nil))
	if serr == nil || !strings.Contains(serr.Error(), "peer certificate is for client alice") {
		t.Fatalf("client at a server-only port: %v", serr)
	}
	// Wrong CA: a certificate from another cluster.
	other := initDir(t, InitOptions{Clients: []string{"mallory"}})
	mallory := load(t, other, Identity{KindClient, "mallory"})
	mallory.Pool = alice.Pool // it trusts our servers, but its own certificate is from elsewhere
	serr, _ = handshake(t, s2.ServerConfig(nil), mallory.ClientConfig(nil))
	if serr == nil || !strings.Contains(Describe(serr), "certificate rejected") {
		t.Fatalf("wrong CA: %v", serr)
	}
	// Expired certificate from the right CA.
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-48 * time.Hour)
	leaf, err := ca.Issue(Identity{KindClient, "old"}, nil, past, past.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(leaf.CertPEM, leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	old := &Creds{Cert: cert, Pool: alice.Pool}
	serr, _ = handshake(t, s2.ServerConfig(nil), old.ClientConfig(nil))
	if serr == nil || !strings.Contains(serr.Error(), "expired") {
		t.Fatalf("expired certificate: %v", serr)
	}
	t.Logf("expired: %s", Describe(serr))
}

func TestLoadFlags(t *testing.T) {
	if c, err := LoadFlags("", "", ""); c != nil || err != nil {
		t.Fatalf("plain: %v %v", c, err)
	}
	if _, err := LoadFlags("a", "", ""); err == nil || !strings.Contains(err.Error(), "go together") {
		t.Fatalf("partial: %v", err)
	}
	dir := initDir(t, InitOptions{Servers: []string{"s1"}})
	other := initDir(t, InitOptions{})
	d := filepath.Join(dir, "servers/s1")
	if _, err := Load(filepath.Join(d, "server-cert.pem"), filepath.Join(d, "server-key.pem"), filepath.Join(other, "ca-cert.pem")); err == nil ||
		!strings.Contains(err.Error(), "does not chain") {
		t.Fatalf("cert from another CA: %v", err)
	}
}

func TestGarbageInsteadOfClientHello(t *testing.T) {
	dir := initDir(t, InitOptions{Servers: []string{"s1"}})
	s1 := load(t, dir, Identity{KindServer, "s1"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tl := NewListener(ln, s1.ServerConfig(nil))
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err == nil {
			c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
			time.Sleep(100 * time.Millisecond)
			c.Close()
		}
	}()
	c, err := tl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	herr := c.(*Conn).Handshake()
	if herr == nil || !strings.Contains(Describe(herr), "not TLS") {
		t.Fatalf("garbage: %v (%s)", herr, Describe(herr))
	}
}

// TestLoggingListenerNamesThePlainClient: a listener for a protocol with
// no TLS negotiation of its own (raft, replication) logs a failed
// handshake once, with a reason that names a plain client, Read's error
// says the same, and the plain client reads the listener's PlainReply.
func TestLoggingListenerNamesThePlainClient(t *testing.T) {
	dir := initDir(t, InitOptions{Servers: []string{"s1"}})
	s1 := load(t, dir, Identity{KindServer, "s1"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var logs bytes.Buffer
	reply := []byte("use TLS\n")
	tl := NewLoggingListener(ln, s1.ServerConfig(nil), ListenOptions{Log: slog.New(slog.NewTextHandler(&logs, nil)),
		Event: "raft_tls_refused", PlainReply: reply})
	plain, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	// the first bytes of a plain hashicorp/raft RequestVote: rpc type 1, msgpack map
	if _, err := plain.Write([]byte{1, 0x86, 0xa9, 'R', 'P', 'C', 'H', 'e', 'a', 'd', 'e', 'r'}); err != nil {
		t.Fatal(err)
	}
	c, err := tl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, rerr := c.Read(make([]byte, 1))
	_, werr := c.Write([]byte{0})
	for _, err := range []error{rerr, werr} {
		if err == nil || !strings.Contains(err.Error(), "refused: not TLS: the first bytes are not a TLS ClientHello (a plain client?)") {
			t.Fatalf("plain client, Read/Write error: %v", err)
		}
		var rh tls.RecordHeaderError
		if !errors.As(err, &rh) {
			t.Fatalf("the error does not wrap tls.RecordHeaderError: %v", err)
		}
	}
	out := logs.String()
	if strings.Count(out, "msg=raft_tls_refused") != 1 || !strings.Contains(out, "remote=127.0.0.1:") ||
		!strings.Contains(out, "a plain client?") || !strings.Contains(out, "level=WARN") {
		t.Fatalf("want one raft_tls_refused warning naming a plain client, got:\n%s", out)
	}
	t.Logf("logged: %s", strings.TrimSpace(out))
	_ = plain.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, 64)
	n, err := io.ReadAtLeast(plain, got, len(reply))
	if err != nil || !bytes.Equal(got[:n], reply) {
		t.Fatalf("plain client read %q, %v; want the plain reply %q", got[:n], err, reply)
	}
}

func mustCA(t *testing.T, dir string) *x509.Certificate {
	t.Helper()
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ca.Cert
}

// TestStalledHandshake: a client that connects and sends nothing costs the
// server at most HandshakeTimeout, and the reason says so; a server that
// accepts and never answers costs Dial at most its context's deadline.
func TestStalledHandshake(t *testing.T) {
	dir := initDir(t, InitOptions{Servers: []string{"s1"}, Clients: []string{"alice"}})
	s1 := load(t, dir, Identity{KindServer, "s1"})
	alice := load(t, dir, Identity{KindClient, "alice"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	tl := NewListener(ln, s1.ServerConfig(nil))
	stall, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer stall.Close()
	c, err := tl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, rerr := c.Read(make([]byte, 1))
	if rerr == nil || !strings.Contains(Describe(rerr), "handshake did not complete within") {
		t.Fatalf("stalled client: %v (%s)", rerr, Describe(rerr))
	}
	t.Logf("stalled client, server side: %s", Describe(rerr))

	// The other way round: a listener that accepts and says nothing.
	mute, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer mute.Close()
	go func() {
		c, err := mute.Accept()
		if err == nil {
			defer c.Close()
			_, _ = c.Read(make([]byte, 1<<10))
			time.Sleep(5 * time.Second)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_, derr := Dial(ctx, &net.Dialer{}, mute.Addr().String(), alice.ClientConfig(Expect(KindServer, "s1")))
	if !errors.Is(derr, context.DeadlineExceeded) {
		t.Fatalf("mute server: %v", derr)
	}
	t.Logf("mute server, client side: %v", derr)
}
