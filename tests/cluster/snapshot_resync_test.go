package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// TestSnapshotResyncedReplicaFailover: a replica killed while the
// primary takes a snapshot, deletes an older one and writes far more than
// its WAL holds comes back through a resync (only the changed regions).
// It then holds exactly the primary's snapshots: after a kill -9 of the
// primary, `snapshot list` on it shows the snapshot of its gap and not the
// deleted one, and it serves that snapshot with the bytes captured when
// it was taken.
func TestSnapshotResyncedReplicaFailover(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	for _, id := range []string{"s1", "s2"} {
		c.startServer(id)
	}
	if out, err := c.cli("volume", "create", "rs", "--size", "32MiB", "--rf", "2", "--durability", "best_effort",
		"--min-copies", "1", "--wal-size", "4MiB"); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	info := c.waitHealthy("rs", 60*time.Second)
	primary, replica := info.Primary.ServerID, info.Replicas[0].ServerID
	uri := func(id, exp string) string { return fmt.Sprintf("nbd://%s/%s", c.nbd[id], exp) }
	if out, err := c.qemuIO(c.nbd[primary], "rs", "write -P 0x51 0 2M", "flush"); err != nil {
		t.Fatalf("write: %v\n%s", err, out)
	}
	if out, err := c.cli("snapshot", "create", "rs", "old"); err != nil {
		t.Fatalf("snapshot create: %v\n%s", err, out)
	}
	// The replica goes away (its data stays); the primary writes past its
	// WAL, takes "gap", deletes "old" and writes on.
	c.servers[replica].kill9()
	for round := 0; round < 3; round++ {
		if out, err := c.qemuIO(c.nbd[primary], "rs", fmt.Sprintf("write -P 0x%x 4M 8M", 0x60+round), "flush"); err != nil {
			t.Fatalf("write: %v\n%s", err, out)
		}
	}
	capture := filepath.Join(t.TempDir(), "gap.raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(primary, "rs"), capture).CombinedOutput(); err != nil {
		t.Fatalf("capture: %v\n%s", err, out)
	}
	out, err := c.cli("snapshot", "create", "rs", "gap", "-o", "json")
	if err != nil {
		t.Fatalf("snapshot create: %v\n%s", err, out)
	}
	var gap api.SnapshotInfo
	if err := json.Unmarshal([]byte(out), &gap); err != nil {
		t.Fatalf("snapshot create -o json: %v\n%s", err, out)
	}
	if out, err := c.cli("snapshot", "delete", "rs", "old"); err != nil {
		t.Fatalf("snapshot delete: %v\n%s", err, out)
	}
	for round := 0; round < 3; round++ {
		if out, err := c.qemuIO(c.nbd[primary], "rs", fmt.Sprintf("write -P 0x%x 0 6M", 0x70+round), "flush"); err != nil {
			t.Fatalf("write: %v\n%s", err, out)
		}
	}
	c.startServer(replica)
	c.waitHealthy("rs", 120*time.Second)
	plog, _ := os.ReadFile(filepath.Join(c.dir, primary+".log"))
	if !strings.Contains(string(plog), "msg=snapshot_sync_planned") || !strings.Contains(string(plog), "plan=resync") {
		t.Fatalf("the replica was not resynced with a snapshot plan; primary log:\n%s", plog)
	}

	c.servers[primary].kill9()
	c.waitFor("promotion of the resynced replica", 60*time.Second, func() error {
		i, err := c.client.VolumeInfo(context.Background(), "rs")
		if err != nil {
			return err
		}
		if i.Primary.ServerID != replica {
			return fmt.Errorf("primary %s", i.Primary.ServerID)
		}
		return nil
	})
	c.waitExport(c.nbd[replica], "rs")
	var list []api.SnapshotInfo
	c.waitFor("snapshot list on the new primary", 30*time.Second, func() error {
		out, err := c.cli("snapshot", "list", "rs", "-o", "json")
		if err != nil {
			return err
		}
		return json.Unmarshal([]byte(out), &list)
	})
	if len(list) != 1 || list[0].Name != "gap" || list[0].UUID != gap.UUID || list[0].LSN != gap.LSN || list[0].ID != gap.ID {
		t.Fatalf("snapshots on the resynced replica: %+v, want only %+v", list, gap)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", capture, uri(replica, "rs@gap")).CombinedOutput(); err != nil {
		t.Fatalf("snapshot gap on the resynced replica: %v\n%s", err, out)
	}
	if out, err := c.qemuIO(c.nbd[replica], "rs", "read -P 0x72 0 6M", "read -P 0x62 6M 6M"); err != nil {
		t.Fatalf("live data on the resynced replica: %v\n%s", err, out)
	}
}
