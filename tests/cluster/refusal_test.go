package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// TestCreateRefusalNamesEachServer: a create no server can take names
// every server's reason, in the one-line error and in -o json.
func TestCreateRefusalNamesEachServer(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	c.startServer("s1")
	c.startServer("s2")
	c.servers["s2"].kill9()
	c.waitFor("s2 not alive", 30*time.Second, func() error {
		srvs, err := c.client.Servers(context.Background())
		if err != nil {
			return err
		}
		for _, si := range srvs {
			if si.ServerID == "s2" && si.Alive {
				return errors.New("s2 still alive")
			}
		}
		return nil
	})
	cmd := exec.Command(blockdBin, "volume", "create", "big", "--size", "100TiB", "--rf", "2", "-o", "json", "--master", c.mAPI[0])
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err == nil {
		t.Fatal("a 100 TiB volume was created")
	}
	line := strings.TrimSpace(stderr.String())
	t.Logf("stderr: %s", line)
	for _, want := range []string{"blockd: volume create: insufficient_servers", "s1: insufficient_capacity: 100 TiB", "s2: not_alive"} {
		if !strings.Contains(line, want) || strings.Contains(line, "\n") {
			t.Errorf("stderr %q: want one line with %q", line, want)
		}
	}
	var body struct {
		Error api.Error `json:"error"`
	}
	if err := json.Unmarshal(out, &body); err != nil {
		t.Fatalf("-o json: %v\n%s", err, out)
	}
	got := map[string]string{}
	for _, p := range body.Error.Placement {
		got[p.ServerID] = p.Rejection
		if p.Reason == "" {
			t.Errorf("%s: no reason", p.ServerID)
		}
	}
	if body.Error.Code != api.CodeInsufficientServers || got["s1"] != "insufficient_capacity" || got["s2"] != "not_alive" {
		t.Errorf("-o json: %s", out)
	}
}
