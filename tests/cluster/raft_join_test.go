package cluster

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/internal/testenv"
)

// Issue 18, item 1, end to end: one POST /v1/raft/join naming an
// unreachable raft address against `blockd serve` is refused; the embedded
// master stays the leader, NBD writes keep working past the lease, and a
// restart on the same data directory serves again. Before the fix the join
// answered 200, the API answered 503 a second later, writes failed once the
// lease ran out, and a restarted serve stayed a raft Candidate for good.
func TestServeRefusesUnsafeRaftJoin(t *testing.T) {
	testenv.RequireTool(t, "qemu-io")
	dir := t.TempDir()
	apiAddr, nbdAddr := freePort(t), freePort(t)
	p := &proc{name: "serve", log: filepath.Join(dir, "serve.log"),
		args: []string{"serve", "--log-file", "-", "--data", filepath.Join(dir, "data"), "--api", apiAddr, "--nbd", nbdAddr}}
	defer func() {
		if t.Failed() {
			b, _ := os.ReadFile(p.log)
			t.Logf("serve log:\n%s", b)
		}
	}()
	client := api.NewClient([]string{apiAddr})
	healthy := func(what string) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			info, err := client.VolumeInfo(ctx, "vol0")
			cancel()
			if err == nil && info.Status == api.StatusHealthy {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: vol0 never healthy: %v %+v", what, err, info)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	write := func(what string, pattern int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			out, err := exec.Command("qemu-io", "-f", "raw",
				"-c", fmt.Sprintf("write -P 0x%x 0 64k", pattern), "-c", fmt.Sprintf("read -P 0x%x 0 64k", pattern),
				fmt.Sprintf("nbd://%s/vol0", nbdAddr)).CombinedOutput()
			if err == nil && !strings.Contains(string(out), "failed") {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: write+read over NBD: %v\n%s", what, err, out)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	p.start(t)
	defer p.kill9()
	healthy("first start")
	write("before the join", 0x11)

	resp, err := http.Post("http://"+apiAddr+"/v1/raft/join", "application/json", strings.NewReader(`{"id":"x","raft_addr":"127.0.0.1:1"}`))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	t.Logf("join answered %d %s", resp.StatusCode, strings.TrimSpace(string(body)))
	if resp.StatusCode < 400 || !strings.Contains(string(body), `"code"`) {
		t.Errorf("join of an unreachable raft address answered %d %s, want a refusal", resp.StatusCode, body)
	}
	// Past the raft leader lease (the old code lost quorum ~1s after the
	// join) and past the 5s primary lease (writes then failed with EPERM).
	time.Sleep(7 * time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	st, err := client.Status(ctx, apiAddr)
	cancel()
	if err != nil || !st.IsLeader || len(st.Peers) != 1 {
		t.Fatalf("status after the join: %+v %v", st, err)
	}
	healthy("after the join")
	write("after the join", 0x22)

	p.stop()
	p.start(t)
	healthy("after restart")
	write("after restart", 0x33)
}
