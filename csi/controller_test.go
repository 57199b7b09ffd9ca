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

// TestControllerPolicy drives the controller over gRPC against a real
// master and two servers: StorageClass parameters reach the master as a
// preset and overrides, a create of the same name with another policy or
// size is AlreadyExists, impossible placements are ResourceExhausted,
// capacity and expansion come from the master.
func TestControllerPolicy(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real blockd processes; skipped in -short mode")
	}
	c := newCluster(t, 2)
	ep, drv := startDriver(t, []string{c.master}, ModeController)
	conn, err := grpc.NewClient(ep, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cc := csi.NewControllerClient(conn)
	ctx := context.Background()
	mount := []*csi.VolumeCapability{capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "ext4", false)}
	create := func(name string, params map[string]string, req int64, caps []*csi.VolumeCapability) (*csi.CreateVolumeResponse, error) {
		return cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: params, VolumeCapabilities: caps,
			CapacityRange: &csi.CapacityRange{RequiredBytes: req}})
	}

	db := map[string]string{"preset": "database", "walSize": "4194304"}
	r, err := create("pvc-db", db, 10<<20, mount)
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.client.VolumeInfo(ctx, r.Volume.VolumeId)
	if err != nil {
		t.Fatal(err)
	}
	if info.Preset != "database" || info.Durability != "sync_all" || info.RF != 2 || info.WALSizeBytes != 4<<20 || info.SizeBytes != 10<<20 {
		t.Fatalf("the master holds %+v, want the database preset with a 4 MiB WAL and 10 MiB", info)
	}
	if r.Volume.VolumeContext[CtxDurability] != "sync_all" {
		t.Fatalf("volume context %v", r.Volume.VolumeContext)
	}
	// Retries are idempotent; a different policy or size is not the same volume.
	if r2, err := create("pvc-db", db, 10<<20, mount); err != nil || r2.Volume.VolumeId != r.Volume.VolumeId {
		t.Fatalf("retry: %v %v", r2, err)
	}
	if _, err := create("pvc-db", map[string]string{"preset": "database", "durability": "best_effort"}, 10<<20, mount); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("other durability: %v, want AlreadyExists", err)
	}
	if _, err := create("pvc-db", db, 20<<20, mount); status.Code(err) != codes.AlreadyExists {
		t.Fatalf("other size: %v, want AlreadyExists", err)
	}
	// Overrides and refusals, each with the code the spec names.
	r, err = create("pvc-rf1", map[string]string{"preset": "general", "rf": "1", "minCopies": "1", "walSize": "4194304"}, 1, mount)
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := c.client.VolumeInfo(ctx, r.Volume.VolumeId); info == nil || info.RF != 1 || info.SizeBytes != 4096 {
		t.Fatalf("rf override / rounding: %+v", info)
	}
	for _, tc := range []struct {
		name   string
		params map[string]string
		caps   []*csi.VolumeCapability
		code   codes.Code
	}{
		{"pvc-rf3", map[string]string{"rf": "3"}, mount, codes.ResourceExhausted},
		{"pvc-preset", map[string]string{"preset": "nosuch"}, mount, codes.InvalidArgument},
		{"pvc-typo", map[string]string{"replicas": "2"}, mount, codes.InvalidArgument},
		{"pvc-quorum", map[string]string{"durability": "sync_quorum", "rf": "2"}, mount, codes.InvalidArgument},
		{"pvc-rwx", nil, []*csi.VolumeCapability{capOf(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, "", false)}, codes.InvalidArgument},
		{"pvc-snmw", nil, []*csi.VolumeCapability{capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER, "", true)}, codes.InvalidArgument},
	} {
		if _, err := create(tc.name, tc.params, 1<<20, tc.caps); status.Code(err) != tc.code {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.code)
		}
		if _, err := c.client.VolumeInfo(ctx, tc.name); err == nil {
			t.Errorf("%s: a refused create left a volume", tc.name)
		}
	}

	capResp, err := cc.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"rf": "1"}})
	if err != nil {
		t.Fatal(err)
	}
	ss, _ := c.client.Servers(ctx)
	var free int64
	for _, s := range ss {
		free += s.FreeBytes
	}
	if capResp.AvailableCapacity != free || capResp.MaximumVolumeSize.GetValue() == 0 {
		t.Fatalf("capacity %v, servers report %d free", capResp, free)
	}

	ex, err := cc.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: "pvc-db",
		CapacityRange: &csi.CapacityRange{RequiredBytes: 12 << 20}})
	if err != nil || ex.CapacityBytes != 12<<20 || !ex.NodeExpansionRequired {
		t.Fatalf("expand: %v %v", ex, err)
	}
	if info, _ := c.client.VolumeInfo(ctx, "pvc-db"); info == nil || info.SizeBytes != 12<<20 {
		t.Fatalf("the master did not expand: %+v", info)
	}
	if _, err := cc.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: "nosuch",
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20}}); status.Code(err) != codes.NotFound {
		t.Fatalf("expand unknown: %v, want NotFound", err)
	}
	// An operation in flight on a volume makes a second one Aborted; other
	// volumes are not held up.
	release, err := drv.lock.acquire("pvc-db", "NodeStageVolume")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "pvc-db"}); status.Code(err) != codes.Aborted {
		t.Fatalf("delete while in flight: %v, want Aborted", err)
	}
	if _, err := create("pvc-db", db, 10<<20, mount); status.Code(err) != codes.Aborted {
		t.Fatalf("create while in flight: %v, want Aborted", err)
	}
	if _, err := cc.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: "pvc-rf1", VolumeCapabilities: mount}); err != nil {
		t.Fatalf("another volume: %v", err)
	}
	release()
	for _, id := range []string{"pvc-db", "pvc-rf1", "pvc-db"} { // twice: delete is idempotent
		if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatalf("delete %s: %v", id, err)
		}
	}
}
