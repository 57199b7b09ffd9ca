package csi

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// TestControllerTLS: against a cluster that serves TLS only, a driver
// with a client certificate creates a volume, snapshots it (the
// primary's admin API, which must present that server's certificate),
// makes a volume from the snapshot and cleans up; a driver without
// credentials is refused at Probe, naming the cause. (The node's NBD
// attach over TLS needs the kernel: tests/vm/csi runs it in the guest.)
func TestControllerTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real blockd processes; skipped in -short mode")
	}
	c := newTLSCluster(t, 2)
	ctx := context.Background()
	client := func(ep string) csi.ControllerClient {
		conn, err := grpc.NewClient(ep, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return csi.NewControllerClient(conn)
	}

	plainEP, _ := startDriver(t, []string{c.master}, ModeController)
	conn, err := grpc.NewClient(plainEP, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("probe without credentials: %v, want FailedPrecondition", err)
	}

	ep, _ := startDriverTLS(t, []string{c.master}, ModeController, c.creds)
	cc := client(ep)
	mount := []*csi.VolumeCapability{capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "ext4", false)}
	params := map[string]string{"walSize": "4194304"}
	if _, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "tls-src", Parameters: params, VolumeCapabilities: mount,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 4 << 20}}); err != nil {
		t.Fatal(err)
	}
	sr, err := cc.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: "tls-src"})
	if err != nil {
		t.Fatalf("snapshot over TLS: %v", err)
	}
	if _, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "tls-copy", Parameters: params, VolumeCapabilities: mount,
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sr.Snapshot.SnapshotId}}}}); err != nil {
		t.Fatalf("clone over TLS: %v", err)
	}
	if ls, err := cc.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err != nil || len(ls.Entries) != 1 {
		t.Fatalf("list over TLS: %v %v", ls, err)
	}
	if _, err := cc.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: sr.Snapshot.SnapshotId}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"tls-copy", "tls-src"} {
		if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.client.VolumeInfo(ctx, "tls-src"); err == nil {
		t.Fatal("tls-src still exists")
	}
}
