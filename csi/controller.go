package csi

import (
	"context"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
)

// Volume context keys returned by CreateVolume (informational for the CO
// and the node).
const (
	CtxPreset     = "blockd.io/preset"
	CtxRF         = "blockd.io/rf"
	CtxDurability = "blockd.io/durability"
)

// ControllerGetCapabilities: create/delete, expand, capacity, list,
// snapshots (create/delete, list) and clones. Not offered:
// publish/unpublish (the node attaches over the network, no controller
// step), GetSnapshot (a newer, optional RPC; ListSnapshots with a
// snapshot ID answers the same), single-node multi-writer, volume
// conditions.
func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

func csiVolume(v *api.VolumeInfo) *csi.Volume {
	return &csi.Volume{VolumeId: v.Name, CapacityBytes: v.SizeBytes, VolumeContext: map[string]string{
		CtxPreset: v.Preset, CtxRF: strconv.Itoa(v.RF), CtxDurability: v.Durability}}
}

// CreateVolume creates a blockd volume named after the request (idempotent
// by name: a retry finds the committed volume through the master's
// request ID; an existing volume of another size or policy is
// AlreadyExists).
func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "create volume: a name is needed")
	}
	if err := CheckCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	params, err := ParseParams(req.GetParameters())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "create volume %s: %v", req.GetName(), err)
	}
	name := VolumeName(req.GetName())
	if req.GetVolumeContentSource() != nil {
		if _, err := sizeFromSource(0, req.GetCapacityRange()); err != nil {
			return nil, err // a malformed range, before any lookup
		}
		release, err := d.lock.acquire(name, "CreateVolume")
		if err != nil {
			return nil, err
		}
		defer release()
		return d.createFromSource(ctx, req, params, name)
	}
	size, err := SizeFor(req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	release, err := d.lock.acquire(name, "CreateVolume")
	if err != nil {
		return nil, err
	}
	defer release()

	existing, err := d.mc.VolumeInfo(ctx, name)
	switch {
	case err == nil:
		return d.adopt(req, params, existing)
	case !api.IsCode(err, api.CodeNotFound):
		return nil, apiStatus("create volume "+name, err)
	}
	info, err := d.mc.CreateVolume(ctx, params.Request(name, size))
	if api.IsCode(err, api.CodeAlreadyExists) {
		// Created meanwhile with another request ID (not by this driver).
		if existing, err2 := d.mc.VolumeInfo(ctx, name); err2 == nil {
			return d.adopt(req, params, existing)
		}
	}
	if err != nil {
		return nil, apiStatus("create volume "+name, err)
	}
	d.log.Info("csi_volume_created", "csi_name", req.GetName(), "volume", name, "size", info.SizeBytes,
		"preset", info.Preset, "rf", info.RF, "durability", info.Durability)
	if params.MinCopies != 0 && info.MinCopies != params.MinCopies {
		d.log.Warn("csi_min_copies_differs", "volume", name, "asked", params.MinCopies, "got", info.MinCopies)
	}
	return &csi.CreateVolumeResponse{Volume: csiVolume(info)}, nil
}

// adopt answers a create for a name that exists: the same volume if it
// satisfies the request, AlreadyExists otherwise.
func (d *Driver) adopt(req *csi.CreateVolumeRequest, p Params, v *api.VolumeInfo) (*csi.CreateVolumeResponse, error) {
	if !SizeFits(v.SizeBytes, req.GetCapacityRange()) {
		return nil, status.Errorf(codes.AlreadyExists, "create volume %s: exists with %d bytes, outside the requested range [%d, %d]",
			v.Name, v.SizeBytes, req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes())
	}
	if ok, why := p.Matches(v); !ok {
		return nil, status.Errorf(codes.AlreadyExists, "create volume %s: exists with another policy: asked %s", v.Name, why)
	}
	return &csi.CreateVolumeResponse{Volume: csiVolume(v)}, nil
}

// DeleteVolume deletes a volume; an unknown one is already deleted.
func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "delete volume: a volume ID is needed")
	}
	release, err := d.lock.acquire(id, "DeleteVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	if err := d.refuseWithSnapshots(ctx, id); err != nil {
		return nil, err
	}
	err = d.mc.DeleteVolume(ctx, id)
	if err != nil && !api.IsCode(err, api.CodeNotFound) && !api.IsCode(err, api.CodeBadRequest) {
		return nil, apiStatus("delete volume "+id, err)
	}
	if err == nil {
		d.log.Info("csi_volume_deleted", "volume", id)
	}
	return &csi.DeleteVolumeResponse{}, nil
}

// deleteSnapshotWait bounds how long DeleteVolume waits for the primary
// to tell the volume's snapshots.
const deleteSnapshotWait = 10 * time.Second

// refuseWithSnapshots makes DeleteVolume FailedPrecondition while the
// volume has snapshots: a blockd snapshot lives in its volume, so
// deleting the volume would silently destroy snapshots the CO still
// holds (the spec's "has snapshots and the plugin doesn't treat them as
// independent entities"). A volume whose primary does not answer is
// deleted anyway (logged): nothing can be read from it.
func (d *Driver) refuseWithSnapshots(ctx context.Context, id string) error {
	_, snaps, err := d.primaryClient(ctx, id, deleteSnapshotWait)
	if err != nil {
		if status.Code(err) != codes.NotFound || isAPIError(err) {
			d.log.Warn("csi_delete_snapshots_unknown", "volume", id, "err", err)
		}
		return nil
	}
	if len(snaps) == 0 {
		return nil
	}
	ids := make([]string, 0, len(snaps))
	for _, s := range snaps {
		ids = append(ids, SnapshotID(id, s.Name))
	}
	return status.Errorf(codes.FailedPrecondition, "delete volume %s: it has %d snapshot(s) (%s); delete them first", id, len(snaps), strings.Join(ids, ", "))
}

// ValidateVolumeCapabilities confirms capabilities blockd can serve.
func (d *Driver) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "validate volume capabilities: a volume ID is needed")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "validate volume capabilities: capabilities are needed")
	}
	v, err := d.mc.VolumeInfo(ctx, id)
	if err != nil {
		if api.IsCode(err, api.CodeBadRequest) {
			return nil, status.Errorf(codes.NotFound, "volume %q does not exist: %v", id, err)
		}
		return nil, apiStatus("validate volume "+id, err)
	}
	if err := CheckCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	if _, err := ParseParams(req.GetParameters()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      csiVolume(v).VolumeContext,
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// listToken prefixes ListVolumes tokens: the name of the last volume of
// the previous page, so deletions between pages neither repeat nor skip.
const listToken = "after:"

// ListVolumes lists blockd volumes by name, paginated.
func (d *Driver) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "list volumes: max_entries %d is negative", req.GetMaxEntries())
	}
	after := ""
	if t := req.GetStartingToken(); t != "" {
		var ok bool
		if after, ok = strings.CutPrefix(t, listToken); !ok || after == "" {
			return nil, status.Errorf(codes.Aborted, "list volumes: starting token %q was not issued by this driver", t)
		}
	}
	vols, err := d.mc.ListVolumes(ctx)
	if err != nil {
		return nil, apiStatus("list volumes", err)
	}
	sort.Slice(vols, func(i, j int) bool { return vols[i].Name < vols[j].Name })
	out := &csi.ListVolumesResponse{}
	for i := range vols {
		if after != "" && vols[i].Name <= after {
			continue
		}
		if m := int(req.GetMaxEntries()); m > 0 && len(out.Entries) == m {
			out.NextToken = listToken + out.Entries[m-1].Volume.VolumeId
			break
		}
		out.Entries = append(out.Entries, &csi.ListVolumesResponse_Entry{Volume: csiVolume(&vols[i])})
	}
	return out, nil
}

// GetCapacity reports the free bytes of the live volume servers: the
// total divided by the replication factor the parameters ask for, and as
// the largest single volume the free space of the RF-th emptiest server
// (placement needs RF distinct servers).
func (d *Driver) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	for _, c := range req.GetVolumeCapabilities() {
		if CheckCapability(c) != nil {
			return &csi.GetCapacityResponse{}, nil // nothing can be created with it
		}
	}
	p, err := ParseParams(req.GetParameters())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "get capacity: %v", err)
	}
	servers, err := d.mc.Servers(ctx)
	if err != nil {
		return nil, apiStatus("get capacity", err)
	}
	var free []int64
	for _, s := range servers {
		if s.Alive && s.FreeBytes > 0 {
			free = append(free, s.FreeBytes)
		}
	}
	rf := p.RF
	if rf == 0 {
		rf = 1
		if p.Preset != "" || len(free) >= 2 {
			rf = 2 // every preset, and the default with two or more servers
		}
	}
	avail, maxVol := Capacity(free, rf)
	return &csi.GetCapacityResponse{AvailableCapacity: avail, MaximumVolumeSize: wrapInt64(maxVol)}, nil
}

// Capacity is GetCapacity's arithmetic: sum(free)/rf, and the rf-th largest
// free space (0 with fewer than rf servers).
func Capacity(free []int64, rf int) (avail, maxVolume int64) {
	if rf <= 0 || len(free) < rf {
		return 0, 0
	}
	s := append([]int64(nil), free...)
	sort.Slice(s, func(i, j int) bool { return s[i] > s[j] })
	var sum int64
	for _, f := range s {
		sum += f
	}
	return sum / int64(rf), s[rf-1]
}

// ControllerExpandVolume grows the volume through the master (the servers
// grow their copies; the node then grows the device and the file system).
func (d *Driver) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "expand volume: a volume ID is needed")
	}
	if req.GetCapacityRange() == nil {
		return nil, status.Error(codes.InvalidArgument, "expand volume: a capacity range is needed")
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := CheckCapability(c); err != nil {
			return nil, err
		}
	}
	size, err := SizeFor(req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	release, err := d.lock.acquire(id, "ControllerExpandVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	v, err := d.mc.VolumeInfo(ctx, id)
	if err != nil {
		return nil, apiStatus("expand volume "+id, err)
	}
	nodeExpand := req.GetVolumeCapability().GetBlock() == nil
	if v.SizeBytes >= size {
		return &csi.ControllerExpandVolumeResponse{CapacityBytes: v.SizeBytes, NodeExpansionRequired: nodeExpand}, nil
	}
	v, err = d.mc.ExpandVolume(ctx, id, size)
	if err != nil {
		return nil, apiStatus("expand volume "+id, err)
	}
	d.log.Info("csi_volume_expanded", "volume", id, "size", v.SizeBytes)
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: v.SizeBytes, NodeExpansionRequired: nodeExpand}, nil
}
