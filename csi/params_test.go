package csi

import (
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
)

func TestParseParams(t *testing.T) {
	p, err := ParseParams(map[string]string{"preset": "database", "rf": "3", "durability": "sync_quorum",
		"minCopies": "2", "walSize": "1048576", "csi.storage.k8s.io/pvc/name": "x"})
	if err != nil {
		t.Fatal(err)
	}
	want := Params{Preset: "database", RF: 3, Durability: "sync_quorum", MinCopies: 2, WALSize: 1 << 20}
	if p != want {
		t.Fatalf("got %+v, want %+v", p, want)
	}
	req := p.Request("v1", 4096)
	if req.Preset != "database" || req.RF != 3 || req.MinCopies != 2 || req.RequestID == "" || req.RequestID != requestID("v1") {
		t.Fatalf("request %+v", req)
	}
	for in, wantErr := range map[string]string{
		"rf=zero":        "rf",
		"durability=bad": "durability",
		"typo=1":         `unknown parameter "typo"`,
		"walSize=-1":     "walSize",
	} {
		k, v, _ := strings.Cut(in, "=")
		if k == "rf" {
			v = "0"
		}
		_, err := ParseParams(map[string]string{k: v})
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%s: err %v, want one naming %q", in, err, wantErr)
		}
	}
}

func TestParamsMatches(t *testing.T) {
	v := &api.VolumeInfo{Preset: "general", RF: 2, Durability: "best_effort", MinCopies: 1, WALSizeBytes: 64 << 20, BlockSize: 4096}
	if ok, why := (Params{}).Matches(v); !ok {
		t.Fatalf("empty params must match: %s", why)
	}
	if ok, _ := (Params{Preset: "general", RF: 2}).Matches(v); !ok {
		t.Fatal("same preset and rf must match")
	}
	if ok, why := (Params{RF: 3}).Matches(v); ok || !strings.Contains(why, "rf 3") {
		t.Fatalf("rf 3 vs 2: ok %v why %q", ok, why)
	}
	if ok, _ := (Params{Durability: "sync_all"}).Matches(v); ok {
		t.Fatal("durability differs")
	}
}

func TestVolumeName(t *testing.T) {
	if got := VolumeName("pvc-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"); got != "pvc-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0" {
		t.Fatalf("a valid name must be kept: %s", got)
	}
	long := strings.Repeat("x", 100)
	a, b := VolumeName(long), VolumeName("has/slash")
	if !volNameRE.MatchString(a) || !volNameRE.MatchString(b) || a == b || VolumeName(long) != a {
		t.Fatalf("hashed names must be valid, distinct and stable: %s %s", a, b)
	}
}

func TestSizeFor(t *testing.T) {
	cases := []struct {
		req, lim int64
		want     int64
		code     codes.Code
	}{
		{0, 0, DefaultVolumeSize, codes.OK},
		{1, 0, 4096, codes.OK},
		{4096, 4096, 4096, codes.OK},
		{5000, 0, 8192, codes.OK},
		{0, 10000, 8192, codes.OK},
		{5000, 6000, 0, codes.OutOfRange}, // no multiple of 4 KiB in range
		{10, 5, 0, codes.OutOfRange},
		{-1, 0, 0, codes.InvalidArgument},
		{0, 100, 0, codes.OutOfRange},
	}
	for _, c := range cases {
		got, err := SizeFor(&csi.CapacityRange{RequiredBytes: c.req, LimitBytes: c.lim})
		if status.Code(err) != c.code || got != c.want {
			t.Errorf("SizeFor(%d, %d) = %d, %v; want %d, %v", c.req, c.lim, got, err, c.want, c.code)
		}
	}
	if got, err := SizeFor(nil); err != nil || got != DefaultVolumeSize {
		t.Errorf("nil range: %d %v", got, err)
	}
	if !SizeFits(8192, &csi.CapacityRange{RequiredBytes: 5000}) || SizeFits(8192, &csi.CapacityRange{RequiredBytes: 9000}) ||
		SizeFits(8192, &csi.CapacityRange{LimitBytes: 4096}) {
		t.Error("SizeFits")
	}
}

func capOf(mode csi.VolumeCapability_AccessMode_Mode, fs string, block bool) *csi.VolumeCapability {
	c := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
	if block {
		c.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		c.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}}
	}
	return c
}

func TestCheckCapability(t *testing.T) {
	ok := []*csi.VolumeCapability{
		capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "", false),
		capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "xfs", false),
		capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY, "ext4", false),
		capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "", true),
	}
	for _, c := range ok {
		if err := CheckCapability(c); err != nil {
			t.Errorf("%v: %v", c, err)
		}
	}
	bad := []*csi.VolumeCapability{
		nil,
		capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER, "", false),
		capOf(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, "", true),
		capOf(csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY, "", false),
		capOf(csi.VolumeCapability_AccessMode_UNKNOWN, "", false),
		capOf(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, "btrfs", false),
		{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}},
	}
	for _, c := range bad {
		if err := CheckCapability(c); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%v: got %v, want InvalidArgument", c, err)
		}
	}
	if status.Code(CheckCapabilities(nil)) != codes.InvalidArgument {
		t.Error("empty list must be InvalidArgument")
	}
}

func TestCapacity(t *testing.T) {
	if a, m := Capacity([]int64{100, 300, 200}, 2); a != 300 || m != 200 {
		t.Fatalf("rf 2: %d %d", a, m)
	}
	if a, m := Capacity([]int64{100}, 2); a != 0 || m != 0 {
		t.Fatalf("too few servers: %d %d", a, m)
	}
	if a, m := Capacity([]int64{100, 50}, 1); a != 150 || m != 100 {
		t.Fatalf("rf 1: %d %d", a, m)
	}
}

func TestInflight(t *testing.T) {
	var f inflight
	rel, err := f.acquire("v", "CreateVolume")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.acquire("v", "DeleteVolume"); status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "CreateVolume") {
		t.Fatalf("second op on v: %v, want Aborted naming CreateVolume", err)
	}
	if r2, err := f.acquire("w", "DeleteVolume"); err != nil {
		t.Fatalf("another volume must not be blocked: %v", err)
	} else {
		r2()
	}
	rel()
	if r3, err := f.acquire("v", "DeleteVolume"); err != nil {
		t.Fatalf("after release: %v", err)
	} else {
		r3()
	}
}

func TestAPIStatus(t *testing.T) {
	for code, want := range map[string]codes.Code{
		api.CodeNotFound: codes.NotFound, api.CodeAlreadyExists: codes.AlreadyExists,
		api.CodeBadRequest: codes.InvalidArgument, api.CodeBadSize: codes.OutOfRange,
		api.CodeInsufficientServers: codes.ResourceExhausted, api.CodeNoPrimary: codes.Unavailable,
		api.CodeInternal: codes.Internal,
	} {
		if got := status.Code(apiStatus("x", api.Errorf(code, "m"))); got != want {
			t.Errorf("%s: %v, want %v", code, got, want)
		}
	}
}
