package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/tlsauth"
)

// tlsCluster is a master and two servers started the README's way with
// certificates from `blockd tls init`.
type tlsCluster struct {
	*cluster
	pki      string
	raftAddr string
	repl     map[string]string // server ID -> replication address
	alice    *tlsauth.Creds
}

func tlsArgs(dir string, prefix string) []string {
	return []string{"--tls-cert", filepath.Join(dir, prefix+"-cert.pem"), "--tls-key", filepath.Join(dir, prefix+"-key.pem"),
		"--tls-ca", filepath.Join(dir, "ca-cert.pem")}
}

func loadCreds(t *testing.T, dir, prefix string) *tlsauth.Creds {
	t.Helper()
	c, err := tlsauth.Load(filepath.Join(dir, prefix+"-cert.pem"), filepath.Join(dir, prefix+"-key.pem"), filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func startTLSCluster(t *testing.T) *tlsCluster {
	c := &tlsCluster{cluster: newCluster(t), repl: map[string]string{}}
	c.pki = filepath.Join(c.dir, "pki")
	out, err := exec.Command(blockdBin, "tls", "init", "--dir", c.pki, "--master", "m1", "--server", "s1,s2", "--client", "alice,bob,carol").CombinedOutput()
	if err != nil {
		t.Fatalf("tls init: %v\n%s", err, out)
	}
	c.alice = loadCreds(t, filepath.Join(c.pki, "clients", "alice"), "client")
	api1, raft1 := freePort(t), freePort(t)
	c.raftAddr = raft1
	m := &proc{name: "master", log: filepath.Join(c.dir, "master0.log"),
		args: append([]string{"master", "--data", filepath.Join(c.dir, "master0"), "--api", api1, "--raft", raft1,
			"--peers", api1 + "=" + raft1, "--lease-ttl", "3s"}, tlsArgs(filepath.Join(c.pki, "masters", "m1"), "server")...)}
	m.start(t)
	c.masters, c.mAPI = append(c.masters, m), append(c.mAPI, api1)
	c.client = api.NewClientTLS(c.mAPI, c.alice.ClientConfig(tlsauth.Expect(tlsauth.KindMaster, "m1")))
	c.waitFor("master leader over TLS", 60*time.Second, func() error {
		st, err := c.client.Status(context.Background(), api1)
		if err != nil {
			return err
		}
		if !st.IsLeader {
			return fmt.Errorf("not leader yet (%s)", st.State)
		}
		return nil
	})
	for _, id := range []string{"s1", "s2"} {
		nbdAddr, repl, httpAddr := freePort(t), freePort(t), freePort(t)
		s := &proc{name: id, log: filepath.Join(c.dir, id+".log"),
			args: append([]string{"server", "--id", id, "--data", filepath.Join(c.dir, id), "--master", api1, "--listen", repl, "--nbd", nbdAddr,
				"--http", httpAddr}, tlsArgs(filepath.Join(c.pki, "servers", id), "server")...)}
		s.start(t)
		c.servers[id], c.nbd[id], c.repl[id], c.http[id] = s, nbdAddr, repl, httpAddr
	}
	c.waitFor("servers registered over TLS", 30*time.Second, func() error {
		srvs, err := c.client.Servers(context.Background())
		if err != nil {
			return err
		}
		alive := 0
		for _, si := range srvs {
			if si.Alive {
				alive++
			}
		}
		if alive != 2 {
			return fmt.Errorf("%d servers alive", alive)
		}
		return nil
	})
	return c
}

// tlsCLI runs a client command with alice's credentials (environment).
func (c *tlsCluster) tlsCLI(args ...string) (string, error) {
	a := filepath.Join(c.pki, "clients", "alice")
	cmd := exec.Command(blockdBin, append(args, "--master", strings.Join(c.mAPI, ","))...)
	cmd.Env = append(os.Environ(), "BLOCKD_TLS_CERT="+filepath.Join(a, "client-cert.pem"),
		"BLOCKD_TLS_KEY="+filepath.Join(a, "client-key.pem"), "BLOCKD_TLS_CA="+filepath.Join(a, "ca-cert.pem"))
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (c *tlsCluster) logHas(name, s string) bool {
	b, _ := os.ReadFile(filepath.Join(c.dir, name+".log"))
	return bytes.Contains(b, []byte(s))
}

func (c *tlsCluster) waitLog(name, s string) {
	c.t.Helper()
	c.waitFor(name+" log: "+s, 30*time.Second, func() error {
		if !c.logHas(name, s) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
}

// TestTLSClusterRefusesStrangers: a cluster with certificates serves its
// clients over TLS (CLI, qemu-io, nbdinfo) and refuses every stranger on
// every port, each with a one-line reason, while it keeps working.
func TestTLSClusterRefusesStrangers(t *testing.T) {
	testenv.RequireTool(t, "nbdinfo")
	c := startTLSCluster(t)
	if out, err := c.tlsCLI("volume", "create", "db", "--size", "64MiB", "--rf", "2", "--durability", "sync_all"); err != nil {
		t.Fatalf("volume create over TLS: %v\n%s", err, out)
	}
	info := c.waitHealthy("db", 60*time.Second)
	primary := info.Primary.ServerID
	host, port, _ := net.SplitHostPort(c.nbd[primary])
	aliceDir := filepath.Join(c.pki, "clients", "alice")
	obj := "tls-creds-x509,id=t0,endpoint=client,dir=" + aliceDir
	img := fmt.Sprintf("driver=nbd,host=%s,port=%s,export=db,tls-creds=t0", host, port)
	qio := func(cmds ...string) (string, error) {
		args := []string{"--object", obj, "--image-opts", img}
		for _, x := range cmds {
			args = append(args, "-c", x)
		}
		out, err := exec.Command("qemu-io", args...).CombinedOutput()
		if err == nil && strings.Contains(string(out), "fail") {
			err = fmt.Errorf("qemu-io reported a failure")
		}
		return string(out), err
	}
	if out, err := qio("write -P 0x5c 0 1M", "flush", "read -P 0x5c 0 1M"); err != nil {
		t.Fatalf("qemu-io over TLS (sync_all, replicated over TLS): %v\n%s", err, out)
	}
	cmd := exec.Command("nbdinfo", fmt.Sprintf("nbds://%s/db?tls-certificates=%s", c.nbd[primary], aliceDir))
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "with TLS") {
		t.Fatalf("nbdinfo over TLS: %v\n%s", err, out)
	}

	refused := func(what, out string, err error, want string) {
		t.Helper()
		if err == nil || !strings.Contains(out, want) {
			t.Fatalf("%s: err %v, output %q, want %q", what, err, out, want)
		}
		t.Logf("refused: %s: %s", what, strings.TrimSpace(strings.Join(strings.Fields(out), " ")))
	}

	// A plain client at each TCP port speaking the port's protocol.
	out, err := c.cli("volume", "list", "--wait", "0s")
	refused("plain CLI at the master API", out+errText(err), err, "requires TLS: give --tls-cert")
	o, err := exec.Command("qemu-img", "info", "nbd://"+c.nbd[primary]+"/db").CombinedOutput()
	refused("plain qemu-img at NBD", string(o), err, "TLS required")

	// A certificate from another cluster's CA, at the API and at NBD.
	other := filepath.Join(c.dir, "other")
	if o, err := exec.Command(blockdBin, "tls", "init", "--dir", other, "--client", "mallory", "--server", "s1").CombinedOutput(); err != nil {
		t.Fatalf("tls init: %v %s", err, o)
	}
	mal := loadCreds(t, filepath.Join(other, "clients", "mallory"), "client")
	mal.Pool = c.alice.Pool
	mc := api.NewClientTLS(c.mAPI, mal.ClientConfig(nil))
	mc.RetryFor = 0
	_, err = mc.ListVolumes(context.Background())
	refused("other CA at the API", errText(err), err, "unknown certificate authority")
	c.waitLog("master0", "api_tls_refused")

	// An expired certificate of our CA, at the API (Go client) and at NBD (qemu refuses it itself).
	ca, err := tlsauth.LoadCA(c.pki)
	if err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-72 * time.Hour)
	leaf, err := ca.Issue(tlsauth.Identity{Kind: tlsauth.KindClient, Name: "old"}, nil, past, past.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	oldCert, err := tls.X509KeyPair(leaf.CertPEM, leaf.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	old := &tlsauth.Creds{Cert: oldCert, Pool: c.alice.Pool}
	oc := api.NewClientTLS(c.mAPI, old.ClientConfig(nil))
	oc.RetryFor = 0
	_, err = oc.ListVolumes(context.Background())
	refused("expired certificate at the API", errText(err), err, "expired certificate")
	c.waitLog("master0", "certificate has expired")

	// A server certificate for another ID: s2's certificate heartbeating as s1.
	s2 := loadCreds(t, filepath.Join(c.pki, "servers", "s2"), "server")
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: s2.ClientConfig(nil)}}
	body, _ := json.Marshal(api.HeartbeatRequest{ServerID: "s1", Addr: c.repl["s1"]})
	resp, err := hc.Post("https://"+c.mAPI[0]+"/v1/heartbeat", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	b := new(bytes.Buffer)
	_, _ = b.ReadFrom(resp.Body)
	resp.Body.Close()
	refused("s2's certificate heartbeating as s1", resp.Status+" "+b.String(), fmt.Errorf("%s", resp.Status), "from the certificate of server")
	// ... and a server started with another server's certificate.
	o, err = exec.Command(blockdBin, append([]string{"server", "--id", "s3", "--data", filepath.Join(c.dir, "s3"), "--master", c.mAPI[0],
		"--listen", freePort(t), "--nbd", freePort(t)}, tlsArgs(filepath.Join(c.pki, "servers", "s2"), "server")...)...).CombinedOutput()
	refused("server s3 with s2's certificate", string(o), err, "certificate of its own ID")
	// A client certificate at the replication port and at the raft port.
	for _, p := range []struct{ what, addr string }{{"replication", c.repl[primary]}, {"raft", c.raftAddr}} {
		conn, err := tls.Dial("tcp", p.addr, c.alice.ClientConfig(nil))
		if err == nil {
			_, err = conn.Write([]byte{1})
			if err == nil {
				_ = conn.SetReadDeadline(time.Now().Add(20 * time.Second))
				_, err = conn.Read(make([]byte, 1))
			}
			conn.Close()
		}
		refused("client certificate at the "+p.what+" port", errText(err), err, "bad certificate")
	}

	// Stalled handshakes and garbage instead of a ClientHello, on every
	// port at once: each is closed by the server (bounded by its deadline).
	ports := map[string]string{"api": c.mAPI[0], "raft": c.raftAddr, "replication": c.repl[primary], "nbd": c.nbd[primary]}
	var wg sync.WaitGroup
	errs := make(chan error, 2*len(ports))
	for name, addr := range ports {
		for _, garbage := range []bool{false, true} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := strangerClosed(addr, name == "nbd", garbage); err != nil {
					errs <- fmt.Errorf("%s (garbage %v): %w", name, garbage, err)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	c.waitLog(primary, "tls_refused")

	// Undisturbed: the volume still takes replicated writes.
	if out, err := qio("write -P 0x6d 1M 1M", "flush", "read -P 0x6d 1M 1M"); err != nil {
		t.Fatalf("qemu-io after the strangers: %v\n%s", err, out)
	}
	if out, err := c.tlsCLI("volume", "info", "db"); err != nil || !strings.Contains(out, primary) {
		t.Fatalf("volume info after the strangers: %v\n%s", err, out)
	}
}

// strangerClosed connects to addr and either stalls (sends nothing, or on
// NBD acknowledges nothing after STARTTLS) or sends garbage where the
// ClientHello belongs, then waits for the server to close the connection.
func strangerClosed(addr string, nbd, garbage bool) error {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if nbd {
		// greeting, flags, STARTTLS: the TLS handshake starts after the ACK
		hello := make([]byte, 18)
		if _, err := conn.Read(hello); err != nil {
			return err
		}
		msg := []byte{0, 0, 0, 3, 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 5, 0, 0, 0, 0}
		if _, err := conn.Write(msg); err != nil {
			return err
		}
	}
	if garbage {
		if _, err := conn.Write([]byte("GET / HTTP/1.0\r\n\r\n\x00\x01garbage")); err != nil {
			return err
		}
	}
	_ = conn.SetReadDeadline(time.Now().Add(90 * time.Second))
	buf := make([]byte, 4096)
	for {
		if _, err := conn.Read(buf); err != nil {
			var ne net.Error
			if errorsAs(err, &ne) && ne.Timeout() {
				return fmt.Errorf("still open after 90 s")
			}
			return nil // closed by the server
		}
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func errorsAs(err error, target any) bool { return errors.As(err, target) }

// TestServeTLS: blockd serve with the certificate of server "local" serves
// NBD and its embedded master over TLS; a client certificate works with
// the CLI and nbdinfo, a plain client is refused.
func TestServeTLS(t *testing.T) {
	testenv.RequireTool(t, "nbdinfo")
	dir := t.TempDir()
	pki := filepath.Join(dir, "pki")
	if out, err := exec.Command(blockdBin, "tls", "init", "--dir", pki, "--server", "local", "--client", "alice").CombinedOutput(); err != nil {
		t.Fatalf("tls init: %v\n%s", err, out)
	}
	apiAddr, nbdAddr := freePort(t), freePort(t)
	p := &proc{name: "serve", log: filepath.Join(dir, "serve.log"),
		args: append([]string{"serve", "--log-file", "-", "--data", filepath.Join(dir, "data"), "--api", apiAddr, "--nbd", nbdAddr, "--volume", "vol0:64MiB"},
			tlsArgs(filepath.Join(pki, "servers", "local"), "server")...)}
	p.start(t)
	defer p.kill9()
	alice := filepath.Join(pki, "clients", "alice")
	env := append(os.Environ(), "BLOCKD_TLS_CERT="+filepath.Join(alice, "client-cert.pem"),
		"BLOCKD_TLS_KEY="+filepath.Join(alice, "client-key.pem"), "BLOCKD_TLS_CA="+filepath.Join(alice, "ca-cert.pem"))
	var out []byte
	var err error
	deadline := time.Now().Add(60 * time.Second)
	for {
		cmd := exec.Command(blockdBin, "volume", "info", "vol0", "-o", "json", "--master", apiAddr, "--wait", "0s")
		cmd.Env = env
		out, err = cmd.CombinedOutput()
		if err == nil && strings.Contains(string(out), `"status": "healthy"`) {
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(p.log)
			t.Fatalf("vol0 never healthy over TLS: %v %s\n%s", err, out, b)
		}
		time.Sleep(200 * time.Millisecond)
	}
	cmd := exec.Command("nbdinfo", fmt.Sprintf("nbds://%s/vol0?tls-certificates=%s", nbdAddr, alice))
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "with TLS") {
		t.Fatalf("nbdinfo over TLS: %v\n%s", err, out)
	}
	out, err = exec.Command(blockdBin, "volume", "list", "--master", apiAddr, "--wait", "0s").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "requires TLS: give --tls-cert") {
		t.Fatalf("plain CLI against serve with TLS: %v\n%s", err, out)
	}
	if b, _ := os.ReadFile(p.log); !strings.Contains(string(b), "over TLS (client certificates required)") {
		t.Fatalf("serve did not say it serves TLS:\n%s", b)
	}
}
