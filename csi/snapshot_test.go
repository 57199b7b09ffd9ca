package csi

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/internal/testenv"
)

func TestSnapshotIDs(t *testing.T) {
	for _, tc := range []struct {
		id        string
		vol, snap string
		ok        bool
	}{
		{"pvc-1@snapshot-2", "pvc-1", "snapshot-2", true},
		{SnapshotID("v", SnapshotName(strings.Repeat("x", 200))), "v", SnapshotName(strings.Repeat("x", 200)), true},
		{"pvc-1", "", "", false},
		{"@s", "", "", false},
		{"v@", "", "", false},
		{"v@a@b", "", "", false},
		{"v/x@s", "", "", false},
		{"non-existing-snapshot-id", "", "", false},
	} {
		v, s, ok := ParseSnapshotID(tc.id)
		if v != tc.vol || s != tc.snap || ok != tc.ok {
			t.Errorf("ParseSnapshotID(%q) = %q %q %v, want %q %q %v", tc.id, v, s, ok, tc.vol, tc.snap, tc.ok)
		}
	}
	if n := SnapshotName("snapshot-0b6c8f5e-1d1c-4f8e-9a43-2b1f1e0e9c11"); n != "snapshot-0b6c8f5e-1d1c-4f8e-9a43-2b1f1e0e9c11" {
		t.Errorf("a Kubernetes snapshot name is kept: got %q", n)
	}
	long := strings.Repeat("s", 128)
	if a, b := SnapshotName(long), SnapshotName(long+"x"); a == b || len(a) > 64 || !strings.HasPrefix(a, "csi-") {
		t.Errorf("long names: %q %q", a, b)
	}
	if a := SnapshotName("has@at"); strings.Contains(a, "@") {
		t.Errorf("a name with @ maps to %q", a)
	}
}

// TestSnapshotNameRule: the driver's snapshot names are exactly the ones
// the engine accepts (a name the driver passes must not be refused by
// the server, and a name the engine takes must parse back from its ID).
func TestSnapshotNameRule(t *testing.T) {
	for _, n := range []string{"a", "snapshot-0b6c8f5e-1d1c-4f8e-9a43-2b1f1e0e9c11", "A.b_c-9", strings.Repeat("x", 64),
		strings.Repeat("x", 65), "", "-a", ".a", "_a", "a@b", "a/b", "a b", "ä", "a\x00"} {
		if got, want := snapNameRE.MatchString(n), blockvol.CheckSnapshotName(n) == nil; got != want {
			t.Errorf("%q: driver says %v, engine says %v", n, got, want)
		}
	}
}

func TestSizeFromSource(t *testing.T) {
	for _, tc := range []struct {
		src      int64
		req, lim int64
		want     int64
		code     codes.Code
	}{
		{src: 64 << 20, want: 64 << 20},
		{src: 64 << 20, req: 1 << 20, want: 64 << 20},
		{src: 64 << 20, req: 100 << 20, want: 100 << 20},
		{src: 64 << 20, req: 100<<20 + 1, want: 100<<20 + 4096},
		{src: 64 << 20, lim: 32 << 20, code: codes.OutOfRange},
		{src: 64 << 20, req: 8 << 20, lim: 4 << 20, code: codes.OutOfRange},
		{src: 64 << 20, req: -1, code: codes.InvalidArgument},
	} {
		got, err := sizeFromSource(tc.src, &csi.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim})
		if status.Code(err) != tc.code || (err == nil && got != tc.want) {
			t.Errorf("sizeFromSource(%d, [%d, %d]) = %d, %v; want %d, %v", tc.src, tc.req, tc.lim, got, err, tc.want, tc.code)
		}
	}
}

// TestControllerSnapshots drives snapshots and clones over gRPC against a
// real master and two servers (with --http), and checks the bytes with
// qemu-io over NBD: a volume made from a snapshot holds the data of the
// snapshot's time, one made from a volume the data of now; every refusal
// carries the code the spec names.
func TestControllerSnapshots(t *testing.T) {
	if testing.Short() {
		t.Skip("starts real blockd processes; skipped in -short mode")
	}
	qemuIO := testenv.RequireTool(t, "qemu-io")
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
	params := map[string]string{"walSize": "4194304"}
	create := func(name string, src *csi.VolumeContentSource, r *csi.CapacityRange) (*csi.CreateVolumeResponse, error) {
		return cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: params, VolumeCapabilities: mount,
			CapacityRange: r, VolumeContentSource: src})
	}
	fromSnap := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
	}
	fromVol := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	}
	// qio runs one qemu-io command on the volume's primary over NBD,
	// waiting for a just-created volume to be served there.
	qio := func(vol, cmd string) error {
		var out []byte
		deadline := time.Now().Add(30 * time.Second)
		for {
			p, err := c.client.PrimaryOf(ctx, vol)
			if err == nil {
				out, err = exec.Command(qemuIO, "-f", "raw", "-c", cmd, fmt.Sprintf("nbd://%s/%s", p.NBDAddr, vol)).CombinedOutput()
			}
			if err == nil && !strings.Contains(string(out), "failed") {
				return nil
			}
			if !strings.Contains(string(out), "can't open") || time.Now().After(deadline) {
				return fmt.Errorf("qemu-io %q on %s: %v\n%s", cmd, vol, err, out)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}

	if _, err := create("src", nil, &csi.CapacityRange{RequiredBytes: 8 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := create("other", nil, &csi.CapacityRange{RequiredBytes: 4 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := qio("src", "write -P 0xaa 0 1M"); err != nil {
		t.Fatal(err)
	}
	snapReq := &csi.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: "src"}
	sr, err := cc.CreateSnapshot(ctx, snapReq)
	if err != nil {
		t.Fatal(err)
	}
	s := sr.Snapshot
	if s.SnapshotId != "src@snap-1" || s.SourceVolumeId != "src" || !s.ReadyToUse || s.SizeBytes != 8<<20 || s.CreationTime.AsTime().IsZero() {
		t.Fatalf("snapshot %v", s)
	}
	if again, err := cc.CreateSnapshot(ctx, snapReq); err != nil || again.Snapshot.SnapshotId != s.SnapshotId ||
		!again.Snapshot.CreationTime.AsTime().Equal(s.CreationTime.AsTime()) {
		t.Fatalf("retry: %v %v, want the same snapshot", again, err)
	}
	for _, tc := range []struct {
		req  *csi.CreateSnapshotRequest
		code codes.Code
	}{
		{&csi.CreateSnapshotRequest{Name: "snap-1", SourceVolumeId: "other"}, codes.AlreadyExists},
		{&csi.CreateSnapshotRequest{Name: "x", SourceVolumeId: "nosuch"}, codes.NotFound},
		{&csi.CreateSnapshotRequest{SourceVolumeId: "src"}, codes.InvalidArgument},
		{&csi.CreateSnapshotRequest{Name: "x"}, codes.InvalidArgument},
		{&csi.CreateSnapshotRequest{Name: "x", SourceVolumeId: "src", Parameters: map[string]string{"rf": "3"}}, codes.InvalidArgument},
	} {
		if _, err := cc.CreateSnapshot(ctx, tc.req); status.Code(err) != tc.code {
			t.Errorf("create snapshot %v: %v, want %v", tc.req, err, tc.code)
		}
	}
	if err := qio("src", "write -P 0xbb 0 1M"); err != nil {
		t.Fatal(err)
	}

	// From the snapshot: the old bytes; from the volume: the new ones.
	r, err := create("from-snap", fromSnap(s.SnapshotId), nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.Volume.CapacityBytes != 8<<20 || r.Volume.ContentSource.GetSnapshot().GetSnapshotId() != s.SnapshotId {
		t.Fatalf("from snapshot: %v", r.Volume)
	}
	if err := qio("from-snap", "read -P 0xaa 0 1M"); err != nil {
		t.Fatal(err)
	}
	if _, err := create("from-vol", fromVol("src"), &csi.CapacityRange{RequiredBytes: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := qio("from-vol", "read -P 0xbb 0 1M"); err != nil {
		t.Fatal(err)
	}
	if err := qio("from-vol", "read -P 0 8M 8M"); err != nil {
		t.Fatal(err)
	}
	if err := qio("src", "read -P 0xbb 0 1M"); err != nil {
		t.Fatal(err)
	}
	// A retried create finds the populated volume (not imported twice).
	if r2, err := create("from-snap", fromSnap(s.SnapshotId), nil); err != nil || r2.Volume.VolumeId != "from-snap" {
		t.Fatalf("retry of a create from a snapshot: %v %v", r2, err)
	}
	for _, tc := range []struct {
		name string
		src  *csi.VolumeContentSource
		r    *csi.CapacityRange
		code codes.Code
	}{
		{"bad-1", fromSnap("src@nosuch"), nil, codes.NotFound},
		{"bad-2", fromSnap("not-an-id"), nil, codes.NotFound},
		{"bad-3", fromVol("nosuch"), nil, codes.NotFound},
		{"bad-4", fromSnap(s.SnapshotId), &csi.CapacityRange{LimitBytes: 4 << 20}, codes.OutOfRange},
	} {
		if _, err := create(tc.name, tc.src, tc.r); status.Code(err) != tc.code {
			t.Errorf("create %s: %v, want %v", tc.name, err, tc.code)
		}
		if _, err := c.client.VolumeInfo(ctx, tc.name); err == nil {
			t.Errorf("%s: a refused create left a volume", tc.name)
		}
	}

	// Lists: filters, pages, a bad token.
	if _, err := cc.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-2", SourceVolumeId: "src"}); err != nil {
		t.Fatal(err)
	}
	if _, err := cc.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-3", SourceVolumeId: "other"}); err != nil {
		t.Fatal(err)
	}
	ids := func(r *csi.ListSnapshotsResponse) []string {
		var out []string
		for _, e := range r.Entries {
			out = append(out, e.Snapshot.SnapshotId)
		}
		return out
	}
	list := func(req *csi.ListSnapshotsRequest) []string {
		t.Helper()
		r, err := cc.ListSnapshots(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return ids(r)
	}
	if got := fmt.Sprint(list(&csi.ListSnapshotsRequest{})); got != "[other@snap-3 src@snap-1 src@snap-2]" {
		t.Errorf("list all: %s (the clones must carry no snapshot)", got)
	}
	if got := fmt.Sprint(list(&csi.ListSnapshotsRequest{SourceVolumeId: "src"})); got != "[src@snap-1 src@snap-2]" {
		t.Errorf("list of src: %s", got)
	}
	if got := fmt.Sprint(list(&csi.ListSnapshotsRequest{SnapshotId: "src@snap-2"})); got != "[src@snap-2]" {
		t.Errorf("list by ID: %s", got)
	}
	for _, req := range []*csi.ListSnapshotsRequest{{SnapshotId: "src@nosuch"}, {SnapshotId: "junk"}, {SourceVolumeId: "nosuch"},
		{SnapshotId: "src@snap-1", SourceVolumeId: "other"}} {
		if got := list(req); len(got) != 0 {
			t.Errorf("list %v: %v, want none", req, got)
		}
	}
	p1, err := cc.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: 2})
	if err != nil || len(p1.Entries) != 2 || p1.NextToken == "" {
		t.Fatalf("page 1: %v %v", p1, err)
	}
	p2, err := cc.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: p1.NextToken})
	if err != nil || fmt.Sprint(ids(p2)) != "[src@snap-2]" || p2.NextToken != "" {
		t.Fatalf("page 2: %v %v", p2, err)
	}
	if _, err := cc.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: "bogus"}); status.Code(err) != codes.Aborted {
		t.Errorf("bad token: %v, want Aborted", err)
	}
	if _, err := cc.ListSnapshots(ctx, &csi.ListSnapshotsRequest{MaxEntries: -1}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("negative max_entries: %v, want InvalidArgument", err)
	}

	// An operation in flight on the volume makes a snapshot call Aborted.
	release, err := drv.lock.acquire("src", "ControllerExpandVolume")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cc.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-4", SourceVolumeId: "src"}); status.Code(err) != codes.Aborted {
		t.Errorf("create snapshot while in flight: %v, want Aborted", err)
	}
	if _, err := cc.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: "src@snap-1"}); status.Code(err) != codes.Aborted {
		t.Errorf("delete snapshot while in flight: %v, want Aborted", err)
	}
	release()

	// A volume with snapshots is not deleted; its snapshots go first.
	if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "src"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("delete a volume with snapshots: %v, want FailedPrecondition", err)
	}
	for _, id := range []string{"src@snap-1", "src@snap-2", "other@snap-3", "src@snap-1", "junk", "nosuch@x"} { // repeats: idempotent
		if _, err := cc.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: id}); err != nil {
			t.Fatalf("delete snapshot %s: %v", id, err)
		}
	}
	if _, err := cc.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("delete snapshot without an ID: %v", err)
	}
	if got := list(&csi.ListSnapshotsRequest{}); len(got) != 0 {
		t.Errorf("snapshots left: %v", got)
	}
	for _, id := range []string{"src", "other", "from-snap", "from-vol"} {
		if _, err := cc.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatalf("delete %s: %v", id, err)
		}
	}
}

// TestSnapStatus: the admin API's refusals reach the CO with the codes
// the spec names for them.
func TestSnapStatus(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code codes.Code
	}{
		{api.Errorf(api.CodeBusy, "snapshot in use"), codes.Aborted},
		{api.Errorf(api.CodeNoSpace, "disk full"), codes.ResourceExhausted},
		{api.Errorf(api.CodeNotPrimary, "moved"), codes.Unavailable},
		{api.Errorf(api.CodeForbidden, "requires TLS"), codes.PermissionDenied},
		{api.Errorf(api.CodeImageConflict, "holds data"), codes.FailedPrecondition},
		{api.Errorf(api.CodeAlreadyExists, "exists"), codes.AlreadyExists},
		{api.Errorf(api.CodeNotFound, "no such snapshot"), codes.NotFound},
		{api.Errorf(api.CodeBadRequest, "bad name"), codes.InvalidArgument},
		{fmt.Errorf("volume v: its primary, server s1, has %w", errNoAdmin), codes.FailedPrecondition},
		{status.Error(codes.NotFound, "volume gone"), codes.NotFound},
		{fmt.Errorf("dial tcp: connection refused"), codes.Unavailable},
	} {
		err := snapStatus("op", tc.err)
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), status.Convert(tc.err).Message()) {
			t.Errorf("%v -> %v, want %v naming the cause", tc.err, err, tc.code)
		}
	}
	if retryable(fmt.Errorf("x: %w", errNoAdmin)) || !retryable(api.Errorf(api.CodeNotPrimary, "x")) ||
		retryable(api.Errorf(api.CodeForbidden, "x")) || retryable(status.Error(codes.NotFound, "x")) {
		t.Error("retryable misclassifies")
	}
}
