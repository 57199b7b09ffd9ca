package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestPlainModeNeedsInsecure: without credentials a daemon binds loopback
// only; a non-loopback address needs --insecure.
func TestPlainModeNeedsInsecure(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"blockd", "server", "--data", dir, "--id", "s1", "--listen", "0.0.0.0:0", "--nbd", "127.0.0.1:0"},
		{"blockd", "serve", "--data", dir, "--nbd", "0.0.0.0:0"},
		{"blockd", "master", "--data", dir, "--api", ":0"},
	} {
		err := run(newApp(), args)
		if err == nil || !strings.Contains(err.Error(), "without TLS") || !strings.Contains(err.Error(), "--insecure") {
			t.Errorf("%v: %v", args[1:], err)
		}
	}
	if !isLoopback("127.0.0.1:1") || !isLoopback("[::1]:1") || !isLoopback("localhost:1") || !isLoopback("unix:/x") {
		t.Error("loopback addresses not recognised")
	}
	if isLoopback(":1") || isLoopback("0.0.0.0:1") || isLoopback("10.0.0.1:1") {
		t.Error("a non-loopback address counted as loopback")
	}
}

// TestTLSInitAndFlags: tls init writes the layout; a daemon refuses a
// certificate of the wrong kind or of another server ID; partial flags
// are refused.
func TestTLSInitAndFlags(t *testing.T) {
	dir := t.TempDir()
	if err := run(newApp(), []string{"blockd", "tls", "init", "--dir", dir, "--server", "s1,s2", "--client", "alice", "--master", "m1"}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"servers/s1/server-cert.pem", "servers/s2/server-key.pem", "clients/alice/client-cert.pem", "masters/m1/ca-cert.pem"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Error(err)
		}
	}
	if err := run(newApp(), []string{"blockd", "tls", "init", "--dir", dir, "--server", "s1"}); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("re-issuing s1: %v", err)
	}
	cred := func(kind, name, p string) []string {
		d := filepath.Join(dir, kind, name)
		return []string{"--tls-cert", filepath.Join(d, p+"-cert.pem"), "--tls-key", filepath.Join(d, p+"-key.pem"), "--tls-ca", filepath.Join(d, "ca-cert.pem")}
	}
	data := t.TempDir()
	err := run(newApp(), append([]string{"blockd", "master", "--data", data, "--api", "127.0.0.1:0"}, cred("clients", "alice", "client")...))
	if err == nil || !strings.Contains(err.Error(), "needs a master certificate") {
		t.Errorf("master with a client certificate: %v", err)
	}
	err = run(newApp(), append([]string{"blockd", "server", "--data", data, "--id", "s1", "--master", "127.0.0.1:1"}, cred("servers", "s2", "server")...))
	if err == nil || !strings.Contains(err.Error(), "certificate of its own ID") {
		t.Errorf("server s1 with s2's certificate: %v", err)
	}
	err = run(newApp(), []string{"blockd", "volume", "list", "--tls-cert", "x.pem"})
	if err == nil || !strings.Contains(err.Error(), "go together") {
		t.Errorf("partial TLS flags: %v", err)
	}
}
