package kernel

import (
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/nbd/wire"
	"github.com/blockd/blockd/tlsauth"
)

func loadCreds(t *testing.T, dir, kind, name, prefix string) *tlsauth.Creds {
	t.Helper()
	d := filepath.Join(dir, kind, name)
	c, err := tlsauth.Load(filepath.Join(d, prefix+"-cert.pem"), filepath.Join(d, prefix+"-key.pem"), filepath.Join(d, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestNegotiateTLSAndProxy: the keeper's path for attach over TLS:
// STARTTLS, OPT_GO over TLS, then the socketpair proxy the kernel would be
// given, used here with a raw NBD READ. A plain handshake against the same
// server is refused with a reason that says TLS is required.
func TestNegotiateTLSAndProxy(t *testing.T) {
	dir := t.TempDir()
	if _, err := tlsauth.Init(dir, tlsauth.InitOptions{Servers: []string{"s1", "s2"}, Clients: []string{"k"}}); err != nil {
		t.Fatal(err)
	}
	srv := loadCreds(t, dir, "servers", "s1", "server")
	cli := loadCreds(t, dir, "clients", "k", "client")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := nbd.NewServer(nbd.StaticExports{{Name: "vol0", Device: zeroDev{1 << 20}}},
		nbd.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))), nbd.WithTLS(srv.ServerConfig(nil)))
	go s.Serve(l)
	t.Cleanup(func() { s.Close() })
	addr := l.Addr().String()

	_, pc, err := dialNegotiate(t, addr, "vol0")
	pc.Close()
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "requires TLS") {
		t.Fatalf("plain handshake against a TLS server: %v", err)
	}
	t.Logf("plain: %v", err)

	// The server is s1; a client expecting s2 refuses it.
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = NegotiateTLS(raw, "vol0", time.Now().Add(10*time.Second), cli.ClientConfig(tlsauth.Expect(tlsauth.KindServer, "s2")))
	if !errors.Is(err, ErrTLS) || !strings.Contains(err.Error(), "want server s2") {
		t.Fatalf("server with another ID: %v", err)
	}
	raw.Close()

	raw, err = net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	tc, exp, err := NegotiateTLS(raw, "vol0", time.Now().Add(10*time.Second), cli.ClientConfig(tlsauth.Expect(tlsauth.KindServer, "s1")))
	if err != nil {
		t.Fatal(err)
	}
	if exp.Size != 1<<20 {
		t.Fatalf("size %d", exp.Size)
	}
	kc, err := tlsProxy(tc)
	if err != nil {
		t.Fatal(err)
	}
	defer kc.Close()
	if _, ok := kc.(*net.UnixConn); !ok {
		t.Fatalf("kernel side is %T", kc)
	}
	req := binary.BigEndian.AppendUint32(nil, wire.MagicRequest)
	req = binary.BigEndian.AppendUint16(req, 0)
	req = binary.BigEndian.AppendUint16(req, wire.CmdRead)
	req = binary.BigEndian.AppendUint64(req, 42)
	req = binary.BigEndian.AppendUint64(req, 4096)
	req = binary.BigEndian.AppendUint32(req, 4096)
	_ = kc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := kc.Write(req); err != nil {
		t.Fatal(err)
	}
	rep := make([]byte, 16+4096)
	if _, err := io.ReadFull(kc, rep); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint32(rep) != wire.MagicSimpleReply || binary.BigEndian.Uint32(rep[4:]) != 0 || binary.BigEndian.Uint64(rep[8:]) != 42 {
		t.Fatalf("reply header % x", rep[:16])
	}
	// The kernel dropping its socket closes the TLS connection.
	kc.Close()
	deadline := time.Now().Add(10 * time.Second)
	for s.Conns() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("server connection still open after the kernel side closed")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
