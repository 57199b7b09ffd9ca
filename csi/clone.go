package csi

import (
	"context"
	"fmt"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
)

// A volume with a content source is `blockd volume clone` done by the
// controller: the master places a new volume, and an image stream of the
// source (api.Client.ExportImage on the source's primary) is imported
// into it (ImportImage on the new primary, which verifies the whole
// stream before the volume changes). A volume source is exported live:
// the source's primary takes a temporary snapshot with a unique name for
// the stream and deletes it afterwards, so the copy is consistent.

// contentSource is a create request's source, resolved.
type contentSource struct {
	vol  string // source volume
	snap string // "" for a volume source (exported live)
	info *api.VolumeInfo
	size int64 // of the snapshot, or of the volume now
}

func (s contentSource) String() string {
	if s.snap == "" {
		return "volume " + s.vol
	}
	return "snapshot " + SnapshotID(s.vol, s.snap)
}

// resolveSource checks the source exists: NotFound otherwise, as the
// spec asks (an ID this driver cannot have issued is not found either).
func (d *Driver) resolveSource(ctx context.Context, cs *csi.VolumeContentSource) (*contentSource, error) {
	var src contentSource
	switch {
	case cs.GetSnapshot() != nil:
		id := cs.GetSnapshot().GetSnapshotId()
		v, s, ok := ParseSnapshotID(id)
		if !ok {
			return nil, status.Errorf(codes.NotFound, "create volume: source snapshot %q does not exist (not a VOLUME@SNAP ID of this driver)", id)
		}
		src.vol, src.snap = v, s
	case cs.GetVolume() != nil:
		src.vol = cs.GetVolume().GetVolumeId()
		if src.vol == "" {
			return nil, status.Error(codes.InvalidArgument, "create volume: the source volume ID is empty")
		}
	default:
		return nil, status.Error(codes.InvalidArgument, "create volume: the content source is neither a snapshot nor a volume")
	}
	info, err := d.mc.VolumeInfo(ctx, src.vol)
	if err != nil {
		if api.IsCode(err, api.CodeNotFound) || api.IsCode(err, api.CodeBadRequest) {
			return nil, status.Errorf(codes.NotFound, "create volume: source %s does not exist: %v", src, err)
		}
		return nil, apiStatus("create volume: source "+src.String(), err)
	}
	src.info, src.size = info, info.SizeBytes
	if src.snap != "" {
		_, snaps, err := d.primaryClient(ctx, src.vol, d.cfg.AttachWait)
		if err != nil {
			return nil, snapStatus("create volume: source "+src.String(), err)
		}
		sn := findSnap(snaps, src.snap)
		if sn == nil {
			return nil, status.Errorf(codes.NotFound, "create volume: source snapshot %s does not exist", SnapshotID(src.vol, src.snap))
		}
		src.size = sn.SizeBytes // the volume may have grown since
	}
	return &src, nil
}

// sizeFromSource decides a cloned volume's size: the source's size when
// the range asks for nothing more, the requested size when it is larger;
// a limit below the source's size is OutOfRange (the copy would not fit).
func sizeFromSource(src int64, r *csi.CapacityRange) (int64, error) {
	if r == nil || (r.GetRequiredBytes() == 0 && r.GetLimitBytes() == 0) {
		return src, nil
	}
	if lim := r.GetLimitBytes(); lim > 0 && lim < src {
		return 0, status.Errorf(codes.OutOfRange, "create volume: the source has %d bytes, above the limit %d", src, lim)
	}
	size, err := SizeFor(r)
	if err != nil {
		return 0, err
	}
	return max(size, src), nil
}

// populate streams the source into the volume dst. A volume populated
// before (a retry of a create whose answer was lost) refuses the import
// as not empty, which is success here: the driver is the only writer of
// a volume it has not handed out yet, and the import is atomic.
func (d *Driver) populate(ctx context.Context, src *contentSource, dst string, retry bool) error {
	what := fmt.Sprintf("create volume %s from %s", dst, src)
	sc, _, err := d.primaryClient(ctx, src.vol, d.cfg.AttachWait)
	if err != nil {
		return snapStatus(what, err)
	}
	dc, _, err := d.primaryClient(ctx, dst, d.cfg.AttachWait)
	if err != nil {
		return snapStatus(what+": the new volume did not come up", err)
	}
	stream, _, err := sc.ExportImage(ctx, src.vol, src.snap, "")
	if err != nil {
		if api.IsCode(err, api.CodeNotFound) {
			return status.Errorf(codes.NotFound, "%s: %v", what, err)
		}
		return snapStatus(what+": export", err)
	}
	defer stream.Close()
	res, err := dc.ImportImage(ctx, dst, stream, false)
	if err != nil {
		if retry && api.IsCode(err, api.CodeImageConflict) {
			d.log.Info("csi_clone_already_populated", "volume", dst, "source", src.String(), "reason", err.Error())
			return nil
		}
		if api.IsCode(err, api.CodeNoSpace) {
			return status.Errorf(codes.ResourceExhausted, "%s: %v", what, err)
		}
		return snapStatus(what+": import", err)
	}
	// The import recreates the source snapshot in the copy; the CO did
	// not ask for it (and would never delete it), so it goes.
	if res.Snapshot != "" {
		if err := dc.DeleteSnapshot(ctx, dst, res.Snapshot); err != nil && !api.IsCode(err, api.CodeNotFound) {
			return snapStatus(fmt.Sprintf("%s: delete the imported snapshot %s", what, SnapshotID(dst, res.Snapshot)), err)
		}
	}
	d.log.Info("csi_volume_populated", "volume", dst, "source", src.String(), "data_bytes", res.DataBytes, "image_bytes", res.ImageBytes)
	return nil
}

// createFromSource is CreateVolume with a content source, the per-volume
// lock held.
func (d *Driver) createFromSource(ctx context.Context, req *csi.CreateVolumeRequest, params Params, name string) (*csi.CreateVolumeResponse, error) {
	src, err := d.resolveSource(ctx, req.GetVolumeContentSource())
	if err != nil {
		return nil, err
	}
	size, err := sizeFromSource(src.size, req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	if params.BlockSize != 0 && src.info.BlockSize%params.BlockSize != 0 {
		return nil, status.Errorf(codes.InvalidArgument, "create volume %s: blockSize %d does not divide the source's block size %d", name, params.BlockSize, src.info.BlockSize)
	}
	if params.BlockSize == 0 {
		params.BlockSize = src.info.BlockSize
	}
	resp := func(v *api.VolumeInfo) *csi.CreateVolumeResponse {
		cv := csiVolume(v)
		cv.ContentSource = req.GetVolumeContentSource()
		return &csi.CreateVolumeResponse{Volume: cv}
	}
	existing, err := d.mc.VolumeInfo(ctx, name)
	switch {
	case err == nil:
		if _, err := d.adopt(req, params, existing); err != nil {
			return nil, err
		}
		if existing.SizeBytes < src.size {
			return nil, status.Errorf(codes.AlreadyExists, "create volume %s: exists with %d bytes, smaller than its source %s (%d)", name, existing.SizeBytes, src, src.size)
		}
		if err := d.populate(ctx, src, name, true); err != nil {
			return nil, err
		}
		return resp(existing), nil
	case !api.IsCode(err, api.CodeNotFound):
		return nil, apiStatus("create volume "+name, err)
	}
	info, err := d.mc.CreateVolume(ctx, params.Request(name, size))
	if err != nil {
		return nil, apiStatus("create volume "+name, err)
	}
	if err := d.populate(ctx, src, name, false); err != nil {
		// Nothing half-made stays behind: the CO retries from scratch.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), d.cfg.AttachWait)
		defer cancel()
		if derr := d.mc.DeleteVolume(dctx, name); derr != nil {
			d.log.Error("csi_clone_undo_failed", "volume", name, "err", derr)
			return nil, status.Errorf(status.Code(err), "%s (and deleting the new volume failed: %v)", status.Convert(err).Message(), derr)
		}
		return nil, status.Errorf(status.Code(err), "%s (the new volume %s was deleted)", status.Convert(err).Message(), name)
	}
	d.log.Info("csi_volume_created", "csi_name", req.GetName(), "volume", name, "size", info.SizeBytes,
		"preset", info.Preset, "rf", info.RF, "durability", info.Durability, "source", src.String())
	return resp(info), nil
}
