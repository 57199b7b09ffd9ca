package cluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// TestImagesAcrossCluster: 1 master + 3 servers, RF=3 sync_all volumes.
// Export from one volume's primary, import into another volume (placed by
// the master, maybe on another primary), a diff on top, a clone; the bytes
// are checked with qemu-img compare against nbdcopy captures. Then the
// importing volume's primary is killed: the new primary reads the same,
// because the import went to the replicas as ordinary WAL records.
func TestImagesAcrossCluster(t *testing.T) {
	testenv := func(name string) {
		if _, err := exec.LookPath(name); err != nil {
			t.Skipf("%s not installed", name)
		}
	}
	testenv("nbdcopy")
	testenv("qemu-img")
	c := newCluster(t)
	c.startMaster()
	for _, id := range []string{"s1", "s2", "s3"} {
		c.startServer(id)
	}
	dir := t.TempDir()
	p := func(n string) string { return filepath.Join(dir, n) }
	mustCLI := func(args ...string) string {
		t.Helper()
		out, err := c.cli(args...)
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return out
	}
	uri := func(vol string) string {
		i := c.info(vol)
		return fmt.Sprintf("nbd://%s/%s", c.nbd[i.Primary.ServerID], vol)
	}
	capture := func(vol, file string) {
		t.Helper()
		if out, err := exec.Command("nbdcopy", uri(vol), file).CombinedOutput(); err != nil {
			t.Fatalf("nbdcopy %s: %v\n%s", vol, err, out)
		}
	}
	same := func(vol, raw string) {
		t.Helper()
		if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, uri(vol)).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img compare %s %s: %v\n%s", raw, vol, err, out)
		}
	}
	for _, v := range []string{"src", "dst"} {
		mustCLI("volume", "create", v, "--size", "64MiB", "--rf", "3", "--durability", "sync_all")
		c.waitHealthy(v, 60*time.Second)
	}
	src := c.info("src")
	c.waitExport(c.nbd[src.Primary.ServerID], "src")
	if out, err := c.qemuIO(c.nbd[src.Primary.ServerID], "src", "write -P 0x31 0 2M", "write -P 0x32 40M 1M", "flush"); err != nil {
		t.Fatalf("write: %v\n%s", err, out)
	}
	mustCLI("snapshot", "create", "src", "a")
	capture("src", p("a.raw"))
	if out, err := c.qemuIO(c.nbd[src.Primary.ServerID], "src", "write -P 0x33 1M 2M", "write -z 40M 512k", "flush"); err != nil {
		t.Fatalf("write: %v\n%s", err, out)
	}
	mustCLI("snapshot", "create", "src", "b")
	capture("src", p("b.raw"))

	mustCLI("volume", "export", "src@a", "--output", p("a.img"))
	mustCLI("volume", "export", "src@b", "--since", "a", "--output", p("ab.img"))
	dst := c.info("dst")
	c.waitExport(c.nbd[dst.Primary.ServerID], "dst")
	mustCLI("volume", "import", "dst", "--input", p("a.img"))
	same("dst", p("a.raw"))
	mustCLI("volume", "import", "dst", "--input", p("ab.img"))
	same("dst", p("b.raw"))
	if _, err := c.cli("volume", "import", "dst", "--input", p("a.img")); err == nil || !strings.Contains(err.Error(), "already imported") {
		t.Fatalf("second import: %v", err)
	}

	// A replica serves neither import nor export, and names the primary.
	rep := dst.Replicas[0].ServerID
	rc := api.NewClient([]string{c.http[rep]})
	f, err := os.Open(p("a.img"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = rc.ImportImage(context.Background(), "dst", f, true)
	f.Close()
	if !api.IsCode(err, api.CodeNotPrimary) || !strings.Contains(err.Error(), dst.Primary.ServerID) {
		t.Fatalf("import sent to replica %s: %v, want not_primary naming %s", rep, err, dst.Primary.ServerID)
	}
	if _, _, err := rc.ExportImage(context.Background(), "dst", "a", ""); !api.IsCode(err, api.CodeNotPrimary) {
		t.Fatalf("export asked of replica %s: %v, want not_primary", rep, err)
	}
	same("dst", p("b.raw"))

	mustCLI("volume", "clone", "src@a", "copy")
	ci := c.waitHealthy("copy", 60*time.Second)
	if ci.RF != 3 || ci.Durability != api.DurabilitySyncAll || ci.SizeBytes != src.SizeBytes {
		t.Fatalf("clone's policy %+v, want the source's (rf 3, sync_all, %d bytes)", ci, src.SizeBytes)
	}
	same("copy", p("a.raw"))

	// Failover of dst: the imported bytes and snapshots are on the replicas.
	old := dst.Primary.ServerID
	c.servers[old].kill9()
	c.waitFor("dst promotion", 60*time.Second, func() error {
		i, err := c.client.VolumeInfo(context.Background(), "dst")
		if err != nil {
			return err
		}
		if i.Primary.ServerID == old || i.Epoch <= dst.Epoch {
			return fmt.Errorf("primary %s epoch %d", i.Primary.ServerID, i.Epoch)
		}
		return nil
	})
	c.waitExport(c.nbd[c.info("dst").Primary.ServerID], "dst")
	same("dst", p("b.raw"))
	var out string
	c.waitFor("snapshots on the new primary", 30*time.Second, func() error {
		var err error
		out, err = c.cli("snapshot", "list", "dst")
		return err
	})
	if !strings.Contains(out, "a ") || !strings.Contains(out, "b ") {
		t.Fatalf("the new primary lacks the imported snapshots:\n%s", out)
	}
}

// TestImagesOverTLS: export, import and clone with client certificates
// (HTTPS to the primaries, which must present the server certificate the
// master names); a plain client gets a one-line "requires TLS".
func TestImagesOverTLS(t *testing.T) {
	c := startTLSCluster(t)
	dir := t.TempDir()
	run := func(args ...string) string {
		t.Helper()
		out, err := c.tlsCLI(args...)
		if err != nil {
			t.Fatalf("blockd %v: %v\n%s", args, err, out)
		}
		return out
	}
	run("volume", "create", "tv", "--size", "32MiB", "--rf", "2")
	c.waitFor("tv primary", 60*time.Second, func() error {
		_, err := c.tlsCLI("snapshot", "list", "tv")
		return err
	})
	run("snapshot", "create", "tv", "s1")
	img := filepath.Join(dir, "tv.img")
	run("volume", "export", "tv@s1", "--output", img)
	run("volume", "create", "tw", "--size", "32MiB", "--rf", "2")
	c.waitFor("tw primary", 60*time.Second, func() error {
		_, err := c.tlsCLI("snapshot", "list", "tw")
		return err
	})
	if out := run("volume", "import", "tw", "--input", img); !strings.Contains(out, "snapshot tw@s1 created") {
		t.Fatalf("import over TLS: %s", out)
	}
	run("volume", "clone", "tv@s1", "tc")
	if out := run("snapshot", "list", "tc"); !strings.Contains(out, "s1") {
		t.Fatalf("clone over TLS has no s1:\n%s", out)
	}
	// Straight to the primary's admin API without a certificate.
	i := c.info("tv")
	_, _, err := api.NewClient([]string{c.http[i.Primary.ServerID]}).ExportImage(context.Background(), "tv", "s1", "")
	if err == nil || !strings.Contains(err.Error(), "requires TLS") {
		t.Fatalf("a plain client asking a TLS server for an export: %v, want a refusal saying it requires TLS", err)
	}
}
