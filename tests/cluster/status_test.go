package cluster

import (
	"bytes"
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

// TestStatusAndWatchDuringRebuild: a replica whose data is lost comes back
// empty and is rebuilt (its WAL long recycled), slowly (its extent writes
// delayed by BLOCKD_VFS_FAULTS); meanwhile `blockd status` shows the
// volume degraded with that replica rebuilding, and `volume info --watch`
// draws the rebuild's progress bar, rising, until the replica is InSync.
// The captures are logged (and kept in status-watch.txt beside the logs).
func TestStatusAndWatchDuringRebuild(t *testing.T) {
	c := newCluster(t)
	c.startMaster()
	c.startServer("s1")
	c.startServer("s2")
	if _, err := c.cli("volume", "create", "w", "--size", "64MiB", "--rf", "2", "--wal-size", "4MiB"); err != nil {
		t.Fatal(err)
	}
	info := c.waitHealthy("w", 30*time.Second)
	primary, replica := info.Primary.ServerID, info.Replicas[0].ServerID
	nbdAddr := c.nbd[primary]
	c.waitExport(nbdAddr, "w")
	// 48 MiB of data through the 4 MiB WAL: the replica cannot catch up
	// from the log once it has lost everything. The writes start 4 KiB
	// past each MiB: chunk-aligned large writes would be written once,
	// outside the log, whose few bytes per write would then retain them
	// all (and a wiped replica would rightly catch up from it).
	for i := 0; i < 48; i += 8 {
		var cmds []string
		for j := i; j < i+8; j++ {
			cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d 1M", j+1, j<<20+4096))
		}
		if out, err := c.qemuIO(nbdAddr, "w", append(cmds, "flush")...); err != nil {
			t.Fatalf("qemu-io: %v\n%s", err, out)
		}
	}
	c.waitHealthy("w", 30*time.Second)

	rp := c.servers[replica]
	rp.kill9()
	if err := os.RemoveAll(filepath.Join(c.dir, replica, "volumes")); err != nil {
		t.Fatal(err)
	}
	rp.env = []string{"BLOCKD_VFS_FAULTS=write:extent:delay,latency=120ms"}
	c.startServer(replica)

	// Watch in the background while the rebuild runs.
	watch := exec.Command(blockdBin, "volume", "info", "w", "--watch", "--interval", "500ms", "--count", "30",
		"--master", strings.Join(c.mAPI, ","))
	var wout, werr bytes.Buffer
	watch.Stdout, watch.Stderr = &wout, &werr
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = watch.Process.Kill() }()

	var status, statusJSON string
	c.waitFor("the replica rebuilding with progress", 60*time.Second, func() error {
		i := c.info("w")
		for _, r := range i.Replicas {
			if r.ServerID == replica && r.State == api.StateRebuilding && r.Progress != nil && r.Progress.DoneBytes > 0 {
				return nil
			}
		}
		return fmt.Errorf("replicas %+v", i.Replicas)
	})
	var err error
	if status, err = c.cli("status"); err != nil {
		t.Fatal(err)
	}
	if statusJSON, err = c.cli("status", "-o", "json"); err != nil {
		t.Fatal(err)
	}
	c.waitHealthy("w", 120*time.Second)
	if err := watch.Wait(); err != nil {
		t.Fatalf("watch: %v: %s", err, werr.String())
	}
	frames := wout.String()
	capture := "$ blockd status\n" + status + "\n$ blockd volume info w --watch --interval 500ms\n" + frames
	_ = os.WriteFile(filepath.Join(c.dir, "status-watch.txt"), []byte(capture), 0o644)
	t.Logf("capture:\n%s", capture)

	for _, want := range []string{"MASTERS (leader " + c.mAPI[0] + ")", "leader", "SERVERS (2, 2 alive)", "VOLUMES (1: 1 degraded)",
		replica + " Rebuilding rebuild"} {
		if !strings.Contains(status, want) {
			t.Errorf("status lacks %q", want)
		}
	}
	var rep struct {
		Leader  string `json:"leader"`
		Volumes []struct {
			Name     string `json:"name"`
			Status   string `json:"status"`
			Primary  string `json:"primary"`
			Epoch    uint64 `json:"epoch"`
			Degraded []struct {
				ServerID string                `json:"server_id"`
				State    string                `json:"state"`
				Progress *api.TransferProgress `json:"progress"`
			} `json:"degraded_replicas"`
		} `json:"volumes"`
		Servers []api.ServerInfo `json:"servers"`
	}
	if err := json.Unmarshal([]byte(statusJSON), &rep); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, statusJSON)
	}
	if rep.Leader != c.mAPI[0] || len(rep.Servers) != 2 || len(rep.Volumes) != 1 || rep.Volumes[0].Primary != primary ||
		len(rep.Volumes[0].Degraded) != 1 || rep.Volumes[0].Degraded[0].ServerID != replica || rep.Volumes[0].Degraded[0].Progress == nil {
		t.Errorf("status -o json: %s", statusJSON)
	}
	// The watch drew the rebuild with a rising bar, then the replica InSync.
	var pcts []string
	for _, line := range strings.Split(frames, "\n") {
		if strings.Contains(line, replica) && strings.Contains(line, "rebuild") && strings.Contains(line, "[") {
			f := strings.Fields(line[strings.Index(line, "]")+1:])
			pcts = append(pcts, f[0])
		}
	}
	if len(pcts) < 2 {
		t.Errorf("watch drew %d rebuild frames (want at least 2): %q", len(pcts), frames)
	}
	if pcts != nil && pcts[0] == pcts[len(pcts)-1] {
		t.Errorf("rebuild progress did not move across frames: %v", pcts)
	}
	if !strings.Contains(frames, "/s") || !strings.Contains(frames, "ETA") {
		t.Error("watch lacks the rate or the ETA")
	}
	lastFrame := frames[strings.LastIndex(strings.TrimRight(frames, "\n"), "volume w "):]
	if !strings.Contains(lastFrame, "InSync") {
		t.Errorf("last frame does not show the replica InSync:\n%s", lastFrame)
	}
}
