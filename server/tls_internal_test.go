package server

import (
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
)

// TestReplDialChecksReplicaID: the primary's dialer accepts only the
// certificate of a server ID the master assigned at the address; a
// server that took over the address (address reuse) is refused.
func TestReplDialChecksReplicaID(t *testing.T) {
	dir := t.TempDir()
	if _, err := tlsauth.Init(dir, tlsauth.InitOptions{Servers: []string{"s1", "s2", "s3"}}); err != nil {
		t.Fatal(err)
	}
	ld := func(id string) *tlsauth.Creds {
		d := filepath.Join(dir, "servers", id)
		c, err := tlsauth.Load(filepath.Join(d, "server-cert.pem"), filepath.Join(d, "server-key.pem"), filepath.Join(d, "ca-cert.pem"))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// s3 now listens where the master placed s2.
	tl := tlsauth.NewListener(ln, ld("s3").ServerConfig(tlsauth.Expect(tlsauth.KindServer, "")))
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	addr := ln.Addr().String()
	s := &Server{cfg: Config{TLS: ld("s1")}, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	s.peers.set([]api.VolumeAssignment{{Volume: "v", Replicas: []api.ServerRef{{ServerID: "s2", Addr: addr}}}})
	_, err = s.replDial(context.Background(), addr)
	if err == nil || !strings.Contains(err.Error(), "presented the certificate of server s3, the master assigned server s2 there") {
		t.Fatalf("dial to s3 in place of s2: %v", err)
	}
	t.Logf("refused: %v", err)
	s.peers.set([]api.VolumeAssignment{{Volume: "v", Replicas: []api.ServerRef{{ServerID: "s3", Addr: addr}}}})
	c, err := s.replDial(context.Background(), addr)
	if err != nil {
		t.Fatalf("dial to the assigned s3: %v", err)
	}
	c.Close()
	if err := checkTLSIdentity(ld("s2"), "s1"); err == nil {
		t.Fatal("server s1 accepted s2's certificate as its own")
	}
}
