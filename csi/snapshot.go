package csi

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
)

// Snapshots are blockd volume snapshots, served by the volume's primary
// on its admin API (api/snapshot.go); the master only says where that
// primary is. A CSI snapshot ID is VOLUME@SNAP (SnapshotID), the same
// spelling as the NBD export of the snapshot.

// primaryClient resolves vol's primary through the master and returns a
// client of its admin API (TLS: it must present that server's
// certificate) and the volume's snapshots. A volume just created is not
// served at once: until wait ends, an unknown volume on the server, a
// server that is not (yet) primary or unreachable, or a primary without
// an admin address are retried. A volume the master does not know is
// NotFound at once.
func (d *Driver) primaryClient(ctx context.Context, vol string, wait time.Duration) (*api.Client, []api.SnapshotInfo, error) {
	deadline := time.Now().Add(wait)
	for {
		c, snaps, err := d.primaryOnce(ctx, vol)
		if err == nil {
			return c, snaps, nil
		}
		if !retryable(err) || time.Now().After(deadline) {
			return nil, nil, err
		}
		select {
		case <-ctx.Done():
			return nil, nil, err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// errNoAdmin marks a primary that runs without an admin API address.
var errNoAdmin = errors.New("no admin API address")

func (d *Driver) primaryOnce(ctx context.Context, vol string) (*api.Client, []api.SnapshotInfo, error) {
	p, err := d.mc.PrimaryOf(ctx, vol)
	if err != nil {
		if api.IsCode(err, api.CodeNotFound) {
			return nil, nil, status.Errorf(codes.NotFound, "volume %q does not exist: %v", vol, err)
		}
		return nil, nil, err
	}
	if p.HTTPAddr == "" {
		return nil, nil, fmt.Errorf("volume %s: its primary, server %s, has %w (start it with blockd server --http ADDR)", vol, p.ServerID, errNoAdmin)
	}
	var c *api.Client
	if d.cfg.TLS == nil {
		c = api.NewClient([]string{p.HTTPAddr})
	} else {
		c = api.NewClientTLS([]string{p.HTTPAddr}, d.cfg.TLS.ClientConfig(tlsauth.Expect(tlsauth.KindServer, p.ServerID)))
	}
	snaps, err := c.ListSnapshots(ctx, vol)
	if err != nil {
		return nil, nil, err
	}
	return c, snaps, nil
}

// retryable tells the errors of a volume whose primary is not serving it
// yet (or not any more) from final ones.
func retryable(err error) bool {
	if _, ok := status.FromError(err); ok && !isAPIError(err) {
		return false // a gRPC status decided here (NotFound of the master)
	}
	if errors.Is(err, errNoAdmin) {
		return false // a server's flags do not change while it runs
	}
	var ae *api.Error
	if !errors.As(err, &ae) {
		return true // transport
	}
	switch ae.Code {
	case api.CodeNotFound, api.CodeNotPrimary, api.CodeNoPrimary, api.CodeUnavailable, api.CodeNotLeader:
		return true
	}
	return false
}

// snapStatus is apiStatus for a call to a primary's admin API: a primary
// that never came up or has no admin address cannot serve snapshots.
func snapStatus(what string, err error) error {
	if errors.Is(err, errNoAdmin) {
		return status.Errorf(codes.FailedPrecondition, "%s: %v", what, err)
	}
	if !isAPIError(err) {
		if _, ok := status.FromError(err); ok {
			return err
		}
	}
	return apiStatus(what, err)
}

func csiSnapshot(vol string, s *api.SnapshotInfo) *csi.Snapshot {
	return &csi.Snapshot{SnapshotId: SnapshotID(vol, s.Name), SourceVolumeId: vol, SizeBytes: s.SizeBytes,
		CreationTime: timestamppb.New(s.Created), ReadyToUse: true}
}

func findSnap(snaps []api.SnapshotInfo, name string) *api.SnapshotInfo {
	for i := range snaps {
		if snaps[i].Name == name {
			return &snaps[i]
		}
	}
	return nil
}

// CreateSnapshot snapshots the source volume on its primary, durable per
// the volume's durability mode when it returns (ready to use at once).
// Idempotent by name: the same name on the same volume is the same
// snapshot; the same name on another volume is AlreadyExists (blockd
// snapshot names are per volume, so every volume is looked at).
func (d *Driver) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "create snapshot: a name is needed")
	}
	vol := req.GetSourceVolumeId()
	if vol == "" {
		return nil, status.Error(codes.InvalidArgument, "create snapshot: a source volume ID is needed")
	}
	if len(req.GetParameters()) > 0 {
		keys := make([]string, 0, len(req.GetParameters()))
		for k := range req.GetParameters() {
			if !strings.HasPrefix(k, "csi.storage.k8s.io/") {
				keys = append(keys, k)
			}
		}
		if len(keys) > 0 {
			sort.Strings(keys)
			return nil, status.Errorf(codes.InvalidArgument, "create snapshot %s: unknown parameter(s) %s (a VolumeSnapshotClass takes none)", req.GetName(), strings.Join(keys, ", "))
		}
	}
	snap := SnapshotName(req.GetName())
	release, err := d.lock.acquire(vol, "CreateSnapshot")
	if err != nil {
		return nil, err
	}
	defer release()
	releaseName, err := d.lock.acquire("snapshot:"+snap, "CreateSnapshot")
	if err != nil {
		return nil, err
	}
	defer releaseName()

	if _, err := d.mc.VolumeInfo(ctx, vol); err != nil {
		if api.IsCode(err, api.CodeNotFound) || api.IsCode(err, api.CodeBadRequest) {
			return nil, status.Errorf(codes.NotFound, "create snapshot %s: source volume %q does not exist: %v", req.GetName(), vol, err)
		}
		return nil, apiStatus("create snapshot "+req.GetName(), err)
	}
	c, snaps, err := d.primaryClient(ctx, vol, d.cfg.AttachWait)
	if err != nil {
		return nil, snapStatus("create snapshot "+req.GetName()+" of "+vol, err)
	}
	if s := findSnap(snaps, snap); s != nil {
		return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(vol, s)}, nil
	}
	if other, err := d.volumeWithSnapshot(ctx, snap, vol); err != nil {
		return nil, err
	} else if other != "" {
		return nil, status.Errorf(codes.AlreadyExists, "create snapshot %s: the name is taken by snapshot %s of another volume", req.GetName(), SnapshotID(other, snap))
	}
	info, err := c.CreateSnapshot(ctx, vol, snap)
	if api.IsCode(err, api.CodeAlreadyExists) { // created meanwhile (not by this driver)
		if _, snaps, err2 := d.primaryOnce(ctx, vol); err2 == nil {
			if s := findSnap(snaps, snap); s != nil {
				return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(vol, s)}, nil
			}
		}
	}
	if err != nil {
		return nil, snapStatus("create snapshot "+SnapshotID(vol, snap), err)
	}
	d.log.Info("csi_snapshot_created", "csi_name", req.GetName(), "snapshot_id", SnapshotID(vol, snap), "size", info.SizeBytes, "lsn", info.LSN)
	return &csi.CreateSnapshotResponse{Snapshot: csiSnapshot(vol, info)}, nil
}

// volumeWithSnapshot returns a volume other than except holding a
// snapshot named snap ("" when none does).
func (d *Driver) volumeWithSnapshot(ctx context.Context, snap, except string) (string, error) {
	all, err := d.allSnapshots(ctx, "")
	if err != nil {
		return "", err
	}
	for _, e := range all {
		if e.vol != except && e.snap.Name == snap {
			return e.vol, nil
		}
	}
	return "", nil
}

type volSnap struct {
	vol  string
	snap api.SnapshotInfo
}

// allSnapshots lists the snapshots of one volume (vol != "") or of every
// volume. A volume the master names but whose primary does not answer
// fails the list (Unavailable): a partial list would hide snapshots.
func (d *Driver) allSnapshots(ctx context.Context, vol string) ([]volSnap, error) {
	var vols []string
	if vol != "" {
		vols = []string{vol}
	} else {
		vs, err := d.mc.ListVolumes(ctx)
		if err != nil {
			return nil, apiStatus("list snapshots", err)
		}
		for _, v := range vs {
			vols = append(vols, v.Name)
		}
	}
	var out []volSnap
	for _, v := range vols {
		_, snaps, err := d.primaryClient(ctx, v, d.cfg.AttachWait)
		if status.Code(err) == codes.NotFound && !isAPIError(err) {
			continue // deleted since the master listed it
		}
		if err != nil {
			if errors.Is(err, errNoAdmin) {
				return nil, snapStatus("list snapshots of "+v, err)
			}
			return nil, status.Errorf(codes.Unavailable, "list snapshots of volume %s: %v", v, err)
		}
		for _, s := range snaps {
			out = append(out, volSnap{vol: v, snap: s})
		}
	}
	return out, nil
}

// DeleteSnapshot deletes a snapshot; an unknown snapshot (or volume, or
// an ID this driver never issued) is already deleted.
func (d *Driver) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "delete snapshot: a snapshot ID is needed")
	}
	vol, snap, ok := ParseSnapshotID(id)
	if !ok {
		return &csi.DeleteSnapshotResponse{}, nil
	}
	release, err := d.lock.acquire(vol, "DeleteSnapshot")
	if err != nil {
		return nil, err
	}
	defer release()
	if _, err := d.mc.VolumeInfo(ctx, vol); err != nil {
		if api.IsCode(err, api.CodeNotFound) || api.IsCode(err, api.CodeBadRequest) {
			return &csi.DeleteSnapshotResponse{}, nil
		}
		return nil, apiStatus("delete snapshot "+id, err)
	}
	c, snaps, err := d.primaryClient(ctx, vol, d.cfg.AttachWait)
	if status.Code(err) == codes.NotFound && !isAPIError(err) {
		return &csi.DeleteSnapshotResponse{}, nil
	}
	if err != nil {
		return nil, snapStatus("delete snapshot "+id, err)
	}
	if findSnap(snaps, snap) == nil {
		return &csi.DeleteSnapshotResponse{}, nil
	}
	if err := c.DeleteSnapshot(ctx, vol, snap); err != nil && !api.IsCode(err, api.CodeNotFound) {
		return nil, snapStatus("delete snapshot "+id, err)
	}
	d.log.Info("csi_snapshot_deleted", "snapshot_id", id)
	return &csi.DeleteSnapshotResponse{}, nil
}

// snapListToken prefixes ListSnapshots tokens: the ID of the last
// snapshot of the previous page (IDs are listed in order, so deletions
// between pages neither repeat nor skip).
const snapListToken = "after:"

// ListSnapshots lists snapshots by ID, filtered by snapshot ID or source
// volume, paginated.
func (d *Driver) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "list snapshots: max_entries %d is negative", req.GetMaxEntries())
	}
	after := ""
	if t := req.GetStartingToken(); t != "" {
		var ok bool
		if after, ok = strings.CutPrefix(t, snapListToken); !ok || after == "" {
			return nil, status.Errorf(codes.Aborted, "list snapshots: starting token %q was not issued by this driver", t)
		}
	}
	vol, name := req.GetSourceVolumeId(), ""
	if id := req.GetSnapshotId(); id != "" {
		v, s, ok := ParseSnapshotID(id)
		if !ok || (vol != "" && v != vol) {
			return &csi.ListSnapshotsResponse{}, nil
		}
		vol, name = v, s
	}
	if vol != "" {
		if _, err := d.mc.VolumeInfo(ctx, vol); err != nil {
			if api.IsCode(err, api.CodeNotFound) || api.IsCode(err, api.CodeBadRequest) {
				return &csi.ListSnapshotsResponse{}, nil
			}
			return nil, apiStatus("list snapshots of "+vol, err)
		}
	}
	all, err := d.allSnapshots(ctx, vol)
	if err != nil {
		return nil, err
	}
	entries := make([]*csi.Snapshot, 0, len(all))
	for i := range all {
		if name == "" || all[i].snap.Name == name {
			entries = append(entries, csiSnapshot(all[i].vol, &all[i].snap))
		}
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].SnapshotId < entries[j].SnapshotId })
	out := &csi.ListSnapshotsResponse{}
	for _, e := range entries {
		if after != "" && e.SnapshotId <= after {
			continue
		}
		if m := int(req.GetMaxEntries()); m > 0 && len(out.Entries) == m {
			out.NextToken = snapListToken + out.Entries[m-1].Snapshot.SnapshotId
			break
		}
		out.Entries = append(out.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: e})
	}
	return out, nil
}

// SnapshotID is the CSI snapshot ID of snapshot snap of volume vol.
func SnapshotID(vol, snap string) string { return vol + "@" + snap }

// ParseSnapshotID splits VOLUME@SNAP; ok is false for an ID this driver
// cannot have issued.
func ParseSnapshotID(id string) (vol, snap string, ok bool) {
	vol, snap, found := strings.Cut(id, "@")
	if !found || !volNameRE.MatchString(vol) || !snapNameRE.MatchString(snap) {
		return "", "", false
	}
	return vol, snap, true
}

// snapNameRE is the rule of blockd snapshot names (the engine's
// CheckSnapshotName: a letter or digit, then letters, digits, '.', '_',
// '-', at most 64 characters; TestSnapshotNameRule holds them together).
var snapNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// SnapshotName maps a CSI snapshot name to a blockd snapshot name: the
// name itself when blockd accepts it (Kubernetes' snapshot-<uuid> does),
// otherwise "csi-" and a hash of it.
func SnapshotName(csiName string) string {
	if snapNameRE.MatchString(csiName) {
		return csiName
	}
	return "csi-" + nameHash(csiName)
}
