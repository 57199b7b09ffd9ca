package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
)

// TestSnapshotFailover: RF=3 sync_all, a snapshot taken through the CLI
// (durable on every acting replica before it returns), more writes, kill
// -9 of the primary: the promoted replica lists the same snapshot and
// serves VOLUME@SNAP with the bytes the volume held when it was taken
// (qemu-img compare against a capture made then).
func TestSnapshotFailover(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	for _, id := range []string{"s1", "s2", "s3"} {
		c.startServer(id)
	}
	if out, err := c.cli("volume", "create", "db", "--size", "64MiB", "--rf", "3", "--durability", "sync_all"); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	info := c.waitHealthy("db", 60*time.Second)
	primary := info.Primary.ServerID
	if info.Primary.HTTPAddr != c.http[primary] {
		t.Fatalf("volume info primary http_addr %q, want the primary's --http %q", info.Primary.HTTPAddr, c.http[primary])
	}
	if out, err := c.qemuIO(c.nbd[primary], "db", "write -P 0x31 0 1M", "write -P 0x32 20M 512k", "flush"); err != nil {
		t.Fatalf("write: %v\n%s", err, out)
	}
	dir := t.TempDir()
	atSnap := filepath.Join(dir, "at-snap.raw")
	if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "raw", fmt.Sprintf("nbd://%s/db", c.nbd[primary]), atSnap).CombinedOutput(); err != nil {
		t.Fatalf("capture: %v\n%s", err, out)
	}
	out, err := c.cli("snapshot", "create", "db", "before", "-o", "json")
	if err != nil {
		t.Fatalf("snapshot create: %v\n%s", err, out)
	}
	var snap api.SnapshotInfo
	if err := json.Unmarshal([]byte(out), &snap); err != nil || snap.Name != "before" || snap.LSN == 0 {
		t.Fatalf("snapshot create -o json: %v\n%s", err, out)
	}
	// A replica refuses snapshot operations and names the primary.
	for id := range c.servers {
		if id == primary {
			continue
		}
		_, err := api.NewClient([]string{c.http[id]}).CreateSnapshot(context.Background(), "db", "elsewhere")
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Code != api.CodeNotPrimary || ae.Status != 409 || ae.Primary == nil || ae.Primary.ServerID != primary {
			t.Fatalf("replica %s: snapshot create answered %v (%+v), want 409 not_primary naming %s", id, err, ae, primary)
		}
		break
	}
	// Writes after the snapshot, flushed to every replica.
	if out, err := c.qemuIO(c.nbd[primary], "db", "write -P 0x41 0 4k", "write -P 0x42 30M 1M", "write -z 20M 512k", "flush"); err != nil {
		t.Fatalf("write: %v\n%s", err, out)
	}

	c.servers[primary].kill9()
	var newInfo *api.VolumeInfo
	c.waitFor("promotion", 60*time.Second, func() error {
		i, err := c.client.VolumeInfo(context.Background(), "db")
		if err != nil {
			return err
		}
		if i.Primary.ServerID == primary || i.Epoch <= info.Epoch {
			return fmt.Errorf("primary %s epoch %d", i.Primary.ServerID, i.Epoch)
		}
		newInfo = i
		return nil
	})
	np := newInfo.Primary.ServerID
	c.waitExport(c.nbd[np], "db")

	// The new primary lists the same snapshot...
	var list []api.SnapshotInfo
	c.waitFor("snapshot list on the new primary", 30*time.Second, func() error {
		out, err := c.cli("snapshot", "list", "db", "-o", "json")
		if err != nil {
			return err
		}
		return json.Unmarshal([]byte(out), &list)
	})
	if len(list) != 1 || list[0].Name != "before" || list[0].LSN != snap.LSN || list[0].ID != snap.ID || list[0].UUID != snap.UUID {
		t.Fatalf("snapshots on the new primary %s: %+v, want %+v", np, list, snap)
	}
	// ...serves it with the same bytes, and the live volume has the writes
	// made after it.
	snapURI := fmt.Sprintf("nbd://%s/db@before", c.nbd[np])
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", atSnap, snapURI).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare of the snapshot on the new primary: %v\n%s", err, out)
	}
	if out, err := c.qemuIO(c.nbd[np], "db", "read -P 0x41 0 4k", "read -P 0x42 30M 1M", "read -P 0 20M 512k"); err != nil {
		t.Fatalf("live reads on the new primary: %v\n%s", err, out)
	}
	// A replica does not serve the snapshot's export.
	for id := range c.servers {
		if id == primary || id == np {
			continue
		}
		if out, err := exec.Command("qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", fmt.Sprintf("nbd://%s/db@before", c.nbd[id])).CombinedOutput(); err == nil || !strings.Contains(string(out), np) {
			t.Fatalf("replica %s served db@before or did not name the primary: %v\n%s", id, err, out)
		}
	}
	// Restore on the new primary: the live volume reads the snapshot again.
	if out, err := c.cli("snapshot", "restore", "db", "before"); err != nil || !strings.Contains(out, "reconnect") {
		t.Fatalf("restore: %v\n%s", err, out)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", atSnap, fmt.Sprintf("nbd://%s/db", c.nbd[np])).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare after restore: %v\n%s", err, out)
	}
}

// TestTLSSnapshotAPI: with TLS the server's admin API is HTTPS and needs a
// client certificate of the cluster CA; the CLI (alice's certificate)
// works end to end and checks that the primary presents the certificate
// of the server the master names.
func TestTLSSnapshotAPI(t *testing.T) {
	c := startTLSCluster(t)
	if out, err := c.tlsCLI("volume", "create", "db", "--size", "64MiB", "--rf", "2", "--durability", "sync_all"); err != nil {
		t.Fatalf("volume create over TLS: %v\n%s", err, out)
	}
	info := c.waitHealthy("db", 60*time.Second)
	primary := info.Primary.ServerID
	if out, err := c.tlsCLI("snapshot", "create", "db", "s1"); err != nil || !strings.Contains(out, "db@s1 created") {
		t.Fatalf("snapshot create over TLS: %v\n%s", err, out)
	}
	out, err := c.tlsCLI("snapshot", "list", "db", "-o", "json")
	var list []api.SnapshotInfo
	if err != nil || json.Unmarshal([]byte(out), &list) != nil || len(list) != 1 || list[0].Name != "s1" {
		t.Fatalf("snapshot list over TLS: %v\n%s", err, out)
	}
	// Without credentials: refused, one line naming what to give.
	out, err = c.cli("snapshot", "list", "db")
	if err == nil {
		t.Fatalf("snapshot list without credentials succeeded:\n%s", out)
	}
	// Plain HTTP to the server's API and HTTPS without a client
	// certificate are both refused.
	if out, err := exec.Command("curl", "-s", "--max-time", "10", "http://"+c.http[primary]+"/v1/server/volumes/db/snapshots").CombinedOutput(); err == nil && strings.Contains(string(out), "s1") {
		t.Fatalf("plain HTTP served the snapshot list:\n%s", out)
	}
	if out, err := exec.Command("curl", "-sk", "--max-time", "10", "https://"+c.http[primary]+"/v1/server/volumes/db/snapshots").CombinedOutput(); err == nil && strings.Contains(string(out), "s1") {
		t.Fatalf("HTTPS without a client certificate served the snapshot list:\n%s", out)
	}
	// Alice's client directly, expecting the wrong server's certificate: refused.
	other := "s1"
	if primary == "s1" {
		other = "s2"
	}
	sc := api.NewClientTLS([]string{c.http[primary]}, c.alice.ClientConfig(tlsauth.Expect(tlsauth.KindServer, other)))
	sc.RetryFor = 0
	if _, err := sc.ListSnapshots(context.Background(), "db"); err == nil {
		t.Fatalf("a client expecting server %s accepted primary %s's certificate", other, primary)
	}
}

// TestSnapshotRebuiltReplicaFailover: a replica whose data is lost is
// rebuilt (its WAL gap long recycled) and gets the primary's snapshots
// with the rebuild; after a kill -9 of the primary it serves them with the
// bytes captured when they were taken.
func TestSnapshotRebuiltReplicaFailover(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	for _, id := range []string{"s1", "s2"} {
		c.startServer(id)
	}
	if out, err := c.cli("volume", "create", "rb", "--size", "32MiB", "--rf", "2", "--durability", "best_effort",
		"--min-copies", "1", "--wal-size", "4MiB"); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	info := c.waitHealthy("rb", 60*time.Second)
	primary, replica := info.Primary.ServerID, info.Replicas[0].ServerID
	dir := t.TempDir()
	uri := func(id, exp string) string { return fmt.Sprintf("nbd://%s/%s", c.nbd[id], exp) }
	captures := map[string]string{}
	for i, snap := range []string{"old", "new"} {
		if out, err := c.qemuIO(c.nbd[primary], "rb", fmt.Sprintf("write -P 0x%x %dM 2M", 0x51+i, 4*i), "write -P 0x61 20M 64k", "flush"); err != nil {
			t.Fatalf("write: %v\n%s", err, out)
		}
		captures[snap] = filepath.Join(dir, snap+".raw")
		if out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(primary, "rb"), captures[snap]).CombinedOutput(); err != nil {
			t.Fatalf("capture: %v\n%s", err, out)
		}
		if out, err := c.cli("snapshot", "create", "rb", snap); err != nil {
			t.Fatalf("snapshot create: %v\n%s", err, out)
		}
	}
	// The replica loses its data; meanwhile the primary writes far more
	// than its WAL holds, so only a rebuild can bring the replica back.
	c.servers[replica].kill9()
	if err := os.RemoveAll(filepath.Join(c.dir, replica)); err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 3; round++ {
		if out, err := c.qemuIO(c.nbd[primary], "rb", fmt.Sprintf("write -P 0x%x 0 30M", 0x70+round), "flush"); err != nil {
			t.Fatalf("write: %v\n%s", err, out)
		}
	}
	c.startServer(replica)
	c.waitHealthy("rb", 120*time.Second)
	log, _ := os.ReadFile(filepath.Join(c.dir, replica+".log"))
	if n := strings.Count(string(log), "msg=snapshot_installed"); n != 2 {
		t.Fatalf("replica log has %d snapshot_installed events, want 2 (plan rebuild):\n%s", n, log)
	}
	c.servers[primary].kill9()
	c.waitFor("promotion of the rebuilt replica", 60*time.Second, func() error {
		i, err := c.client.VolumeInfo(context.Background(), "rb")
		if err != nil {
			return err
		}
		if i.Primary.ServerID != replica {
			return fmt.Errorf("primary %s", i.Primary.ServerID)
		}
		return nil
	})
	c.waitExport(c.nbd[replica], "rb")
	for snap, file := range captures {
		if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", file, uri(replica, "rb@"+snap)).CombinedOutput(); err != nil {
			t.Fatalf("snapshot %s on the rebuilt replica: %v\n%s", snap, err, out)
		}
	}
	if out, err := c.qemuIO(c.nbd[replica], "rb", "read -P 0x72 0 30M"); err != nil {
		t.Fatalf("live data on the rebuilt replica: %v\n%s", err, out)
	}
}
