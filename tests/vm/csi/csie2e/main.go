// Command csie2e drives a running `blockd csi` through a volume's life as
// the kubelet and the external sidecars would, inside the kernel guest
// (tests/vm/csi): create, stage (attach over NBD, mkfs, mount), publish,
// write files, unpublish, unstage (detach), stage again (the file system
// is found, not remade), verify the files, expand (controller, then node:
// the device and ext4 grow while mounted), stats, a snapshot of the mounted
// volume and volumes made from it and from the volume (staged: the files
// are there), a read-only publish, a
// block-mode volume written through its published device, and clean
// teardown. It prints E2E-OK at the end and exits non-zero at the first
// failure.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

func main() {
	endpoint := flag.String("endpoint", "unix:///tmp/csi/csi.sock", "driver endpoint")
	work := flag.String("work", "/tmp/e2e", "directory for staging and target paths")
	phase := flag.String("phase", "all", "all | restart1 (stage, publish, write; the driver is then restarted) | restart2 (the new driver process finds the volume, unstages it) | tls (a driver with a client certificate against a TLS-only cluster)")
	flag.Parse()
	var err error
	switch *phase {
	case "all":
		err = run(*endpoint, *work)
	case "restart1", "restart2":
		err = restart(*endpoint, *work, *phase == "restart1")
	case "tls":
		err = tlsLife(*endpoint, *work)
	default:
		err = fmt.Errorf("unknown phase %q", *phase)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "E2E-FAIL (%s): %v\n", *phase, err)
		os.Exit(1)
	}
	fmt.Printf("E2E-OK %s\n", *phase)
}

// restart: in phase 1 a volume is staged, published and written; the
// guest script then stops the driver (its devices stay attached), writes
// more through the mount and starts a new driver; in phase 2 the new
// process stages it again (idempotent, no keeper), the files are intact,
// and unpublish and unstage detach the device the old process attached.
func restart(endpoint, work string, first bool) error {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	cc, nc := csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	rw := mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	staging, target := filepath.Join(work, "rstaging"), filepath.Join(work, "rtarget")
	sumsFile := filepath.Join(work, "restart.sums")
	id := "pvc-restart"
	stage := &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rw}
	if first {
		if err := os.MkdirAll(staging, 0o755); err != nil {
			return err
		}
		if _, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: id, VolumeCapabilities: []*csi.VolumeCapability{rw},
			CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}, Parameters: map[string]string{"walSize": "4194304"}}); err != nil {
			return fmt.Errorf("create: %w", err)
		}
		if _, err := nc.NodeStageVolume(ctx, stage); err != nil {
			return fmt.Errorf("stage: %w", err)
		}
		if _, err := nc.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: rw}); err != nil {
			return fmt.Errorf("publish: %w", err)
		}
		sums, err := writeFiles(target, 4)
		if err != nil {
			return err
		}
		var b strings.Builder
		for name, sum := range sums {
			fmt.Fprintf(&b, "%x  %s\n", sum, filepath.Base(name))
		}
		step("restart: wrote %d files before the driver restart", len(sums))
		return os.WriteFile(sumsFile, []byte(b.String()), 0o644)
	}
	if _, err := nc.NodeStageVolume(ctx, stage); err != nil {
		return fmt.Errorf("stage by the new driver process: %w", err)
	}
	b, err := os.ReadFile(sumsFile)
	if err != nil {
		return err
	}
	n := 0
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		want, name, _ := strings.Cut(line, "  ")
		data, err := os.ReadFile(filepath.Join(target, name))
		if err != nil {
			return err
		}
		if fmt.Sprintf("%x", sha256.Sum256(data)) != want {
			return fmt.Errorf("%s differs after the driver restart", name)
		}
		n++
	}
	if st, err := nc.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target}); err != nil || st.Usage[0].Used == 0 {
		return fmt.Errorf("stats after restart: %v %v", st, err)
	}
	if _, err := nc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		return fmt.Errorf("unpublish: %w", err)
	}
	if _, err := nc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		return fmt.Errorf("unstage of a device the old process attached: %w", err)
	}
	if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	step("restart: %d files intact across the driver restart; unstaged by the new process", n)
	return nil
}

// tlsLife: against a cluster that serves TLS only (the NBD server
// refuses a session without STARTTLS), a driver with a client
// certificate stages a volume (the kernel's socket proxied through TLS
// by the keeper), writes files, expands it (the node asks the primary
// for the size over NBD with TLS), snapshots it and stages a volume made
// from the snapshot with the files there.
func tlsLife(endpoint, work string) error {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	cc, nc := csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	rw := mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	staging, target := filepath.Join(work, "tstaging"), filepath.Join(work, "ttarget")
	if err := os.MkdirAll(staging, 0o755); err != nil {
		return err
	}
	id := "pvc-tls"
	if _, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: id, VolumeCapabilities: []*csi.VolumeCapability{rw},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}, Parameters: map[string]string{"walSize": "4194304"}}); err != nil {
		return fmt.Errorf("create: %w", err)
	}
	if _, err := nc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rw}); err != nil {
		return fmt.Errorf("stage over TLS: %w", err)
	}
	if _, err := nc.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: rw}); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	sums, err := writeFiles(target, 4)
	if err != nil {
		return err
	}
	if _, err := cc.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 48 << 20}, VolumeCapability: rw}); err != nil {
		return fmt.Errorf("controller expand: %w", err)
	}
	if ne, err := nc.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target, StagingTargetPath: staging,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 48 << 20}, VolumeCapability: rw}); err != nil || ne.CapacityBytes != 48<<20 {
		return fmt.Errorf("node expand over TLS: %v %v", ne, err)
	}
	step("tls: staged, %d files written, expanded to 48 MiB", len(sums))
	snapID, err := snapshotAndClone(ctx, cc, nc, work, id, target, sums)
	if err != nil {
		return fmt.Errorf("tls: %w", err)
	}
	if _, err := nc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		return fmt.Errorf("unpublish: %w", err)
	}
	if _, err := nc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		return fmt.Errorf("unstage: %w", err)
	}
	if _, err := cc.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}); err != nil {
		return fmt.Errorf("delete snapshot: %w", err)
	}
	if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	step("tls: the volume's life over TLS, snapshot and clone included")
	return nil
}

func step(format string, a ...any) { fmt.Printf("e2e: "+format+"\n", a...) }

func mountCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}}}
}

func run(endpoint, work string) error {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	cc, nc := csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rw := mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	staging, target := filepath.Join(work, "staging"), filepath.Join(work, "target")
	if err := os.MkdirAll(staging, 0o755); err != nil {
		return err
	}

	cv, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-e2e", VolumeCapabilities: []*csi.VolumeCapability{rw},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}, Parameters: map[string]string{"walSize": "4194304"}})
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	id := cv.Volume.VolumeId
	step("created %s (%d bytes)", id, cv.Volume.CapacityBytes)
	stage := func() error {
		_, err := nc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rw})
		return err
	}
	publish := func(ro bool) error {
		_, err := nc.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: rw, Readonly: ro})
		return err
	}
	unpublish := func() error {
		_, err := nc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
		return err
	}
	unstage := func() error {
		_, err := nc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
		return err
	}
	if err := stage(); err != nil {
		return fmt.Errorf("stage: %w", err)
	}
	if err := publish(false); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	sums, err := writeFiles(target, 8)
	if err != nil {
		return err
	}
	step("wrote %d files through %s", len(sums), target)
	if err := unpublish(); err != nil {
		return fmt.Errorf("unpublish: %w", err)
	}
	if err := unstage(); err != nil {
		return fmt.Errorf("unstage: %w", err)
	}
	if b, _ := os.ReadFile("/proc/mounts"); bytes.Contains(b, []byte(staging)) {
		return fmt.Errorf("staging path still mounted after unstage:\n%s", b)
	}
	step("unstaged: device detached")

	if err := stage(); err != nil {
		return fmt.Errorf("stage again: %w", err)
	}
	if err := stage(); err != nil {
		return fmt.Errorf("stage is not idempotent: %w", err)
	}
	if err := publish(false); err != nil {
		return fmt.Errorf("publish again: %w", err)
	}
	if err := verifyFiles(target, sums); err != nil {
		return fmt.Errorf("after re-stage: %w", err)
	}
	step("re-staged: %d files intact (the file system was found, not remade)", len(sums))

	before, err := statfsBytes(target)
	if err != nil {
		return err
	}
	ex, err := cc.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: id,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}, VolumeCapability: rw})
	if err != nil {
		return fmt.Errorf("controller expand: %w", err)
	}
	if !ex.NodeExpansionRequired {
		return fmt.Errorf("controller expand of a mount volume must ask for node expansion")
	}
	ne, err := nc.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target,
		StagingTargetPath: staging, CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}, VolumeCapability: rw})
	if err != nil {
		return fmt.Errorf("node expand: %w", err)
	}
	after, err := statfsBytes(target)
	if err != nil {
		return err
	}
	if ne.CapacityBytes != 128<<20 || after < before*3/2 {
		return fmt.Errorf("node expand: device %d bytes, file system %d -> %d bytes", ne.CapacityBytes, before, after)
	}
	step("expanded while mounted: device %d bytes, ext4 %d -> %d bytes", ne.CapacityBytes, before, after)
	more, err := writeFiles(target, 4)
	if err != nil {
		return fmt.Errorf("write after expand: %w", err)
	}
	st, err := nc.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || len(st.Usage) != 2 || st.Usage[0].Total != after || st.Usage[0].Used == 0 {
		return fmt.Errorf("stats: %v %v", st, err)
	}
	step("stats: %d of %d bytes used, %d inodes used", st.Usage[0].Used, st.Usage[0].Total, st.Usage[1].Used)

	snapID, err := snapshotAndClone(ctx, cc, nc, work, id, target, merge(sums, more))
	if err != nil {
		return err
	}

	// Read-only publish: writes fail with EROFS, reads work.
	if err := unpublish(); err != nil {
		return fmt.Errorf("unpublish: %w", err)
	}
	if err := publish(true); err != nil {
		return fmt.Errorf("publish read-only: %w", err)
	}
	if err := os.WriteFile(filepath.Join(target, "nope"), []byte("x"), 0o644); err == nil || !strings.Contains(err.Error(), "read-only") {
		return fmt.Errorf("write to a read-only publish: %v, want EROFS", err)
	}
	if err := verifyFiles(target, merge(sums, more)); err != nil {
		return fmt.Errorf("read-only publish: %w", err)
	}
	step("read-only publish: writes refused, %d files readable", len(sums)+len(more))
	if err := unpublish(); err != nil {
		return fmt.Errorf("unpublish: %w", err)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		return fmt.Errorf("unpublish left the target path: %v", err)
	}
	if err := unstage(); err != nil {
		return fmt.Errorf("unstage: %w", err)
	}
	// The snapshot lives in its volume: deleting the volume first is
	// refused, after the snapshot it goes.
	if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); status.Code(err) != codes.FailedPrecondition {
		return fmt.Errorf("delete a volume that has a snapshot: %v, want FailedPrecondition", err)
	}
	if _, err := cc.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snapID}); err != nil {
		return fmt.Errorf("delete snapshot: %w", err)
	}
	if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	step("deleted: the volume with a snapshot refused, then the snapshot and the volume")

	return blockVolume(ctx, cc, nc, work)
}

// snapshotAndClone: a snapshot of the mounted volume src (its files
// synced), a file written after it, then a volume from the snapshot and
// one from the volume itself, each staged and published: the first holds
// exactly the files of the snapshot, the second the later file too. It
// returns the snapshot's ID; the clones are deleted.
func snapshotAndClone(ctx context.Context, cc csi.ControllerClient, nc csi.NodeClient, work, src, srcTarget string, sums map[string][32]byte) (string, error) {
	rw := mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)
	unix.Sync()
	sr, err := cc.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snapshot-e2e", SourceVolumeId: src})
	if err != nil {
		return "", fmt.Errorf("create snapshot: %w", err)
	}
	snap := sr.Snapshot
	if !snap.ReadyToUse || snap.SourceVolumeId != src || snap.SizeBytes == 0 || snap.CreationTime == nil {
		return "", fmt.Errorf("create snapshot answered %v", snap)
	}
	if again, err := cc.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snapshot-e2e", SourceVolumeId: src}); err != nil || again.Snapshot.SnapshotId != snap.SnapshotId {
		return "", fmt.Errorf("create snapshot again (idempotent): %v %v", again, err)
	}
	ls, err := cc.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: src})
	if err != nil || len(ls.Entries) != 1 || ls.Entries[0].Snapshot.SnapshotId != snap.SnapshotId {
		return "", fmt.Errorf("list snapshots of %s: %v %v", src, ls, err)
	}
	step("snapshot %s of the mounted volume (%d bytes)", snap.SnapshotId, snap.SizeBytes)
	later, err := writeFiles(srcTarget, 1)
	if err != nil {
		return "", fmt.Errorf("write after the snapshot: %w", err)
	}

	for _, c := range []struct {
		name   string
		source *csi.VolumeContentSource
		want   map[string][32]byte
		absent map[string][32]byte
	}{
		{"pvc-e2e-from-snap", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.SnapshotId}}}, sums, later},
		{"pvc-e2e-from-vol", &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
			Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src}}}, merge(sums, later), nil},
	} {
		cv, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: c.name, VolumeCapabilities: []*csi.VolumeCapability{rw},
			Parameters: map[string]string{"walSize": "4194304"}, VolumeContentSource: c.source})
		if err != nil {
			return "", fmt.Errorf("create %s: %w", c.name, err)
		}
		id := cv.Volume.VolumeId
		if cv.Volume.ContentSource == nil || cv.Volume.CapacityBytes != snap.SizeBytes {
			return "", fmt.Errorf("create %s answered %v (want the content source and %d bytes)", c.name, cv.Volume, snap.SizeBytes)
		}
		staging, target := filepath.Join(work, c.name+"-staging"), filepath.Join(work, c.name+"-target")
		if err := os.MkdirAll(staging, 0o755); err != nil {
			return "", err
		}
		if _, err := nc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: rw}); err != nil {
			return "", fmt.Errorf("stage %s: %w", c.name, err)
		}
		if _, err := nc.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: rw}); err != nil {
			return "", fmt.Errorf("publish %s: %w", c.name, err)
		}
		if err := verifyFiles(target, c.want); err != nil {
			return "", fmt.Errorf("%s: %w", c.name, err)
		}
		for name := range c.absent {
			if _, err := os.Stat(filepath.Join(target, filepath.Base(name))); !os.IsNotExist(err) {
				return "", fmt.Errorf("%s holds %s, written after the snapshot (%v)", c.name, filepath.Base(name), err)
			}
		}
		// The copy is independent: a write to it leaves the source alone.
		if _, err := writeFiles(target, 1); err != nil {
			return "", fmt.Errorf("write to %s: %w", c.name, err)
		}
		if ls, err := cc.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: id}); err != nil || len(ls.Entries) != 0 {
			return "", fmt.Errorf("%s carries snapshots the CO did not ask for: %v %v", c.name, ls, err)
		}
		step("%s: staged, %d files there as at its source, %d absent, writable", c.name, len(c.want), len(c.absent))
		if _, err := nc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			return "", fmt.Errorf("unpublish %s: %w", c.name, err)
		}
		if _, err := nc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			return "", fmt.Errorf("unstage %s: %w", c.name, err)
		}
		if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			return "", fmt.Errorf("delete %s: %w", c.name, err)
		}
	}
	if err := verifyFiles(srcTarget, merge(sums, later)); err != nil {
		return "", fmt.Errorf("the source after its clones: %w", err)
	}
	step("snapshot clone: the files are there")
	return snap.SnapshotId, nil
}

// blockVolume: a raw block volume published as a device file; a pattern
// written through it reads back after unpublish and publish.
func blockVolume(ctx context.Context, cc csi.ControllerClient, nc csi.NodeClient, work string) error {
	bc := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}}
	cv, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-e2e-block", VolumeCapabilities: []*csi.VolumeCapability{bc},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}, Parameters: map[string]string{"walSize": "4194304"}})
	if err != nil {
		return fmt.Errorf("create block: %w", err)
	}
	id := cv.Volume.VolumeId
	staging, target := filepath.Join(work, "bstaging"), filepath.Join(work, "bpub", "dev")
	if err := os.MkdirAll(staging, 0o755); err != nil {
		return err
	}
	if _, err := nc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: bc}); err != nil {
		return fmt.Errorf("stage block: %w", err)
	}
	pub := &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: bc}
	if _, err := nc.NodePublishVolume(ctx, pub); err != nil {
		return fmt.Errorf("publish block: %w", err)
	}
	pattern := make([]byte, 1<<20)
	rand.New(rand.NewSource(7)).Read(pattern)
	f, err := os.OpenFile(target, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(pattern, 3<<20); err != nil {
		f.Close()
		return fmt.Errorf("write block device: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	f.Close()
	st, err := nc.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil || st.Usage[0].Total != 16<<20 {
		return fmt.Errorf("block stats: %v %v", st, err)
	}
	if _, err := nc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		return fmt.Errorf("unpublish block: %w", err)
	}
	if _, err := nc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		return fmt.Errorf("unstage block: %w", err)
	}
	if _, err := nc.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: bc}); err != nil {
		return fmt.Errorf("stage block again: %w", err)
	}
	if _, err := nc.NodePublishVolume(ctx, pub); err != nil {
		return fmt.Errorf("publish block again: %w", err)
	}
	got := make([]byte, len(pattern))
	f, err = os.Open(target)
	if err != nil {
		return err
	}
	_, err = f.ReadAt(got, 3<<20)
	f.Close()
	if err != nil || !bytes.Equal(got, pattern) {
		return fmt.Errorf("block pattern after re-attach differs (err %v)", err)
	}
	step("block volume: 1 MiB pattern intact across detach and re-attach")
	if _, err := nc.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		return err
	}
	if _, err := nc.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		return err
	}
	_, err = cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
	return err
}

var seq int

func writeFiles(dir string, n int) (map[string][32]byte, error) {
	out := map[string][32]byte{}
	r := rand.New(rand.NewSource(int64(seq + 1)))
	for i := 0; i < n; i++ {
		seq++
		b := make([]byte, (i+1)*96<<10)
		r.Read(b)
		name := filepath.Join(dir, fmt.Sprintf("f%03d", seq))
		if err := os.WriteFile(name, b, 0o644); err != nil {
			return nil, fmt.Errorf("write %s: %w", name, err)
		}
		out[name] = sha256.Sum256(b)
	}
	unix.Sync()
	return out, nil
}

func verifyFiles(dir string, sums map[string][32]byte) error {
	for name, want := range sums {
		b, err := os.ReadFile(filepath.Join(dir, filepath.Base(name)))
		if err != nil {
			return err
		}
		if sha256.Sum256(b) != want {
			return fmt.Errorf("%s: content differs", name)
		}
	}
	return nil
}

func merge(a, b map[string][32]byte) map[string][32]byte {
	out := map[string][32]byte{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

func statfsBytes(path string) (int64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", path, err)
	}
	return int64(fs.Blocks) * int64(fs.Bsize), nil
}
