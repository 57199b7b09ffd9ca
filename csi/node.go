package csi

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/nbd/kernel"
	"github.com/blockd/blockd/tlsauth"
)

// MaxVolumesPerNode is the nbd driver's default device count (nbds_max).
const MaxVolumesPerNode = 16

// stagedVol is a volume this process attached: its device and keeper.
type stagedVol struct {
	dev     *kernel.Device
	staging string
	block   bool
	stop    context.CancelFunc
	done    chan struct{} // closed when the keeper returned
	keepErr error         // the keeper's result, once done is closed
}

// NodeGetInfo names the node. No topology: volumes are reachable from
// every node.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.cfg.NodeID, MaxVolumesPerNode: MaxVolumesPerNode}, nil
}

// NodeGetCapabilities: stage/unstage, expand, volume stats.
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// resolver asks the master where the volume's primary serves NBD.
func (d *Driver) resolver(id string) func(context.Context) (string, error) {
	return func(ctx context.Context) (string, error) {
		p, err := d.mc.PrimaryOf(ctx, id)
		if err != nil {
			return "", err
		}
		if p.NBDAddr == "" {
			return "", fmt.Errorf("volume %q: primary %s has no NBD address", id, p.ServerID)
		}
		d.log.Info("csi_primary", "volume", id, "server", p.ServerID, "nbd_addr", p.NBDAddr, "epoch", p.Epoch)
		return p.NBDAddr, nil
	}
}

// deviceOf finds the attached /dev/nbdN whose backend is volume id (an
// attach of this process or of an earlier one), "" if none.
func deviceOf(id string) string {
	ents, _ := filepath.Glob("/sys/block/nbd*/backend")
	for _, e := range ents {
		b, err := os.ReadFile(e)
		if err == nil && strings.TrimSpace(string(b)) == id {
			return "/dev/" + filepath.Base(filepath.Dir(e))
		}
	}
	return ""
}

func (d *Driver) stagedOf(id string) *stagedVol {
	d.nodeMu.Lock()
	defer d.nodeMu.Unlock()
	s := d.staged[id]
	if s != nil {
		select {
		case <-s.done: // the keeper gave up or the device was detached
			delete(d.staged, id)
			return nil
		default:
		}
	}
	return s
}

// NodeStageVolume attaches the volume over NBD (the keeper runs in this
// process and reconnects after failovers), makes the file system if the
// device is blank and mounts it at the staging path. Block volumes are
// only attached.
func (d *Driver) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id, staging, vc := req.GetVolumeId(), req.GetStagingTargetPath(), req.GetVolumeCapability()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "stage: a volume ID is needed")
	case staging == "":
		return nil, status.Error(codes.InvalidArgument, "stage: a staging target path is needed")
	case vc == nil:
		return nil, status.Error(codes.InvalidArgument, "stage: a volume capability is needed")
	}
	if err := CheckCapability(vc); err != nil {
		return nil, err
	}
	release, err := d.lock.acquire(id, "NodeStageVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	staging = filepath.Clean(staging)
	block := vc.GetBlock() != nil

	if s := d.stagedOf(id); s != nil {
		if s.staging != staging || s.block != block {
			return nil, status.Errorf(codes.AlreadyExists, "stage %s: already staged at %s (block %v)", id, s.staging, s.block)
		}
		if !block {
			if m, err := mountAt(staging); err != nil || m == nil {
				return nil, status.Errorf(codes.Internal, "stage %s: attached as %s but %s is not mounted", id, s.dev.Path, staging)
			}
		}
		return &csi.NodeStageVolumeResponse{}, nil
	}
	if dev := deviceOf(id); dev != "" {
		// Left attached by an earlier driver process. Staged as asked
		// already: say so (idempotent), without a keeper in this process.
		if block || mountedFrom(staging, dev) {
			d.log.Warn("csi_stage_without_keeper", "volume", id, "device", dev, "staging", staging,
				"effect", "no reconnect after a failover until unstaged and staged again")
			return &csi.NodeStageVolumeResponse{}, nil
		}
		return nil, status.Errorf(codes.FailedPrecondition,
			"stage %s: %s is attached to it (left by an earlier driver process) but not mounted at %s: unstage it first", id, dev, staging)
	}
	if !block {
		if st, err := os.Stat(staging); err != nil || !st.IsDir() {
			return nil, status.Errorf(codes.InvalidArgument, "stage %s: staging path %s is not a directory", id, staging)
		}
	}

	s, err := d.attach(ctx, id)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			d.stopKeeper(s)
		}
	}()
	s.staging, s.block = staging, block
	if !block {
		m := vc.GetMount()
		if err := d.formatAndMount(s.dev.Path, staging, m.GetFsType(), m.GetMountFlags(),
			vc.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY); err != nil {
			return nil, err
		}
	}
	d.nodeMu.Lock()
	d.staged[id] = s
	d.nodeMu.Unlock()
	ok = true
	d.log.Info("csi_volume_staged", "volume", id, "device", s.dev.Path, "staging", staging, "block", block)
	return &csi.NodeStageVolumeResponse{}, nil
}

// attach connects a kernel nbd device to the volume's primary and starts
// its keeper.
func (d *Driver) attach(ctx context.Context, id string) (*stagedVol, error) {
	if _, err := d.mc.VolumeInfo(ctx, id); err != nil {
		return nil, apiStatus("stage "+id, err)
	}
	pol := kernel.DefaultPolicy
	pol.GiveUp = d.cfg.GiveUp
	actx, cancel := context.WithTimeout(ctx, d.cfg.AttachWait+30*time.Second)
	defer cancel()
	dev, err := kernel.Attach(actx, kernel.Options{
		Volume: id, Resolve: d.resolver(id), Connections: d.cfg.NBDConnections, Index: -1,
		Policy: pol, Logger: d.log, AttachWait: d.cfg.AttachWait,
		// The master vouched for the volume: an unknown export means its
		// server has not picked it up yet.
		RetryUnknownExport: true,
		TLS:                d.nbdTLS(),
	})
	if err != nil {
		code := codes.Internal
		switch {
		case errors.Is(err, kernel.ErrNoModule), errors.Is(err, kernel.ErrNotRoot):
			code = codes.FailedPrecondition
		case api.IsCode(err, api.CodeNotFound):
			code = codes.NotFound
		case api.IsCode(err, api.CodeNoPrimary), errors.Is(err, context.DeadlineExceeded):
			code = codes.Unavailable
		case errors.Is(err, kernel.ErrBusy):
			code = codes.ResourceExhausted
		}
		return nil, status.Errorf(code, "stage %s: %v", id, err)
	}
	kctx, stop := context.WithCancel(context.Background())
	s := &stagedVol{dev: dev, stop: stop, done: make(chan struct{})}
	go func() {
		s.keepErr = dev.Keep(kctx)
		if s.keepErr != nil {
			d.log.Error("csi_keeper_exited", "volume", id, "device", dev.Path, "err", s.keepErr)
		}
		close(s.done)
	}()
	return s, nil
}

// stopKeeper stops a keeper (which disconnects the device) and waits.
func (d *Driver) stopKeeper(s *stagedVol) {
	s.stop()
	<-s.done
}

// leaveAttached logs the devices whose keepers end with this process:
// they stay connected, without reconnects until they are staged again
// by a later process (driver shutdown).
func (d *Driver) leaveAttached() {
	d.nodeMu.Lock()
	defer d.nodeMu.Unlock()
	for id, s := range d.staged {
		d.log.Warn("csi_device_left_attached", "volume", id, "device", s.dev.Path,
			"effect", "no reconnect after a failover until the volume is staged again")
	}
}

// formatAndMount makes fsType on a blank device and mounts it at target.
// A device holding a file system is mounted as it is (never reformatted);
// one holding something unrecognised is refused.
func (d *Driver) formatAndMount(dev, target, fsType string, opts []string, readOnly bool) error {
	if fsType == "" {
		fsType = DefaultFSType
	}
	head, err := readHead(dev)
	if err != nil {
		return status.Errorf(codes.Internal, "stage: %v", err)
	}
	switch found := detectFS(head); found {
	case "":
		if readOnly {
			return status.Errorf(codes.FailedPrecondition, "stage: %s is blank and the volume is read-only: nothing to mount", dev)
		}
		d.log.Info("csi_mkfs", "device", dev, "fs_type", fsType)
		if err := mkfs(dev, fsType); err != nil {
			return status.Errorf(codes.Internal, "stage: %v", err)
		}
	case fsType:
	case "unknown":
		return status.Errorf(codes.FailedPrecondition, "stage: %s holds data that is not ext4 or xfs: refusing to format or mount it", dev)
	default:
		return status.Errorf(codes.FailedPrecondition, "stage: %s holds %s, the volume capability asks for %s", dev, found, fsType)
	}
	if err := mountFS(dev, target, fsType, opts, readOnly); err != nil {
		return status.Errorf(codes.Internal, "stage: %v", err)
	}
	return nil
}

// NodeUnstageVolume unmounts the staging path and detaches the device.
func (d *Driver) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "unstage: a volume ID is needed")
	case staging == "":
		return nil, status.Error(codes.InvalidArgument, "unstage: a staging target path is needed")
	}
	release, err := d.lock.acquire(id, "NodeUnstageVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	staging = filepath.Clean(staging)
	if err := unmount(staging); err != nil {
		return nil, status.Errorf(codes.Internal, "unstage %s: %v", id, err)
	}
	dev := deviceOf(id)
	if dev != "" {
		if ma, mi, err := devNumbers(dev); err == nil {
			if still, _ := mountsOfDevice(ma, mi); len(still) > 0 {
				return nil, status.Errorf(codes.FailedPrecondition, "unstage %s: %s is still mounted at %s (unpublish first)", id, dev, strings.Join(still, ", "))
			}
		}
	}
	d.nodeMu.Lock()
	s := d.staged[id]
	delete(d.staged, id)
	d.nodeMu.Unlock()
	if s != nil {
		d.stopKeeper(s)
		d.log.Info("csi_volume_unstaged", "volume", id, "device", s.dev.Path)
		return &csi.NodeUnstageVolumeResponse{}, nil
	}
	if dev != "" {
		// Left by an earlier process of the driver. kernel.Detach signals
		// the pid in the device's pid file: drop a stale one first (in a
		// container the dead driver's pid is this one's again).
		if idx, err := kernel.ParseDevice(dev); err == nil {
			dropStalePidFile(kernel.PidFile(idx))
		}
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := kernel.Detach(dctx, dev, false); err != nil {
			return nil, status.Errorf(codes.Internal, "unstage %s: %v", id, err)
		}
		d.log.Info("csi_volume_unstaged", "volume", id, "device", dev, "keeper", "none")
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// NodePublishVolume bind-mounts the staged file system (or, for a block
// volume, the device) at the target path, read-only where asked.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target, staging, vc := req.GetVolumeId(), req.GetTargetPath(), req.GetStagingTargetPath(), req.GetVolumeCapability()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "publish: a volume ID is needed")
	case target == "":
		return nil, status.Error(codes.InvalidArgument, "publish: a target path is needed")
	case staging == "":
		return nil, status.Error(codes.InvalidArgument, "publish: a staging target path is needed (the driver stages)")
	case vc == nil:
		return nil, status.Error(codes.InvalidArgument, "publish: a volume capability is needed")
	}
	if err := CheckCapability(vc); err != nil {
		return nil, err
	}
	release, err := d.lock.acquire(id, "NodePublishVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	target, staging = filepath.Clean(target), filepath.Clean(staging)
	dev := deviceOf(id)
	if dev == "" {
		return nil, status.Errorf(codes.FailedPrecondition, "publish %s: the volume is not staged on this node", id)
	}
	readOnly := req.GetReadonly() || vc.GetAccessMode().GetMode() == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	if m, err := mountAt(target); err != nil {
		return nil, status.Errorf(codes.Internal, "publish %s: %v", id, err)
	} else if m != nil {
		if ro := hasOpt(m.Options, "ro"); ro != readOnly {
			return nil, status.Errorf(codes.AlreadyExists, "publish %s: %s is already published with read-only %v", id, target, ro)
		}
		return &csi.NodePublishVolumeResponse{}, nil
	}
	var src string
	if vc.GetBlock() != nil {
		src = dev
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "publish %s: %v", id, err)
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "publish %s: create target file: %v", id, err)
		}
		f.Close()
	} else {
		if m, err := mountAt(staging); err != nil || m == nil {
			return nil, status.Errorf(codes.FailedPrecondition, "publish %s: staging path %s is not mounted (stage first)", id, staging)
		}
		src = staging
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "publish %s: %v", id, err)
		}
	}
	if err := bindMount(src, target, readOnly, vc.GetMount().GetMountFlags()); err != nil {
		return nil, status.Errorf(codes.Internal, "publish %s: %v", id, err)
	}
	d.log.Info("csi_volume_published", "volume", id, "target", target, "read_only", readOnly, "block", vc.GetBlock() != nil)
	return &csi.NodePublishVolumeResponse{}, nil
}

// mountedFrom reports whether path is a mount of block device dev.
func mountedFrom(path, dev string) bool {
	ma, mi, err := devNumbers(dev)
	if err != nil {
		return false
	}
	m, err := mountAt(path)
	return err == nil && m != nil && m.Major == ma && m.Minor == mi
}

// dropStalePidFile removes a keeper pid file that names this process or
// a process that is not a running blockd.
func dropStalePidFile(path string) {
	if pid, ok := kernel.KeeperPid(path); ok && pid != os.Getpid() {
		return // a live keeper (blockd attach nbd): Detach stops it
	}
	_ = os.Remove(path)
}

func hasOpt(opts, o string) bool {
	for _, x := range strings.Split(opts, ",") {
		if x == o {
			return true
		}
	}
	return false
}

// NodeUnpublishVolume unmounts the target path and removes it.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "unpublish: a volume ID is needed")
	case target == "":
		return nil, status.Error(codes.InvalidArgument, "unpublish: a target path is needed")
	}
	release, err := d.lock.acquire(id, "NodeUnpublishVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	target = filepath.Clean(target)
	if err := unmount(target); err != nil {
		return nil, status.Errorf(codes.Internal, "unpublish %s: %v", id, err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "unpublish %s: remove %s: %v", id, target, err)
	}
	d.log.Info("csi_volume_unpublished", "volume", id, "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// volumeAt checks that path is where volume id is mounted (a file system
// of its device, or a bind of the device itself) and returns the device.
func volumeAt(id, path string) (dev string, block bool, err error) {
	dev = deviceOf(id)
	if dev == "" {
		return "", false, status.Errorf(codes.NotFound, "volume %s is not attached on this node", id)
	}
	ma, mi, err := devNumbers(dev)
	if err != nil {
		return "", false, status.Errorf(codes.Internal, "volume %s: %v", id, err)
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", false, status.Errorf(codes.NotFound, "volume %s: path %s: %v", id, path, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		if unix.Major(uint64(st.Rdev)) == ma && unix.Minor(uint64(st.Rdev)) == mi {
			return dev, true, nil
		}
		return "", false, status.Errorf(codes.NotFound, "volume %s is not published at %s (another device)", id, path)
	}
	m, err := mountAt(filepath.Clean(path))
	if err != nil {
		return "", false, status.Errorf(codes.Internal, "volume %s: %v", id, err)
	}
	if m == nil || m.Major != ma || m.Minor != mi {
		return "", false, status.Errorf(codes.NotFound, "volume %s is not mounted at %s", id, path)
	}
	return dev, false, nil
}

// NodeGetVolumeStats reports bytes and inodes of a mounted volume, or the
// size of a block one.
func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "volume stats: a volume ID is needed")
	case path == "":
		return nil, status.Error(codes.InvalidArgument, "volume stats: a volume path is needed")
	}
	dev, block, err := volumeAt(id, path)
	if err != nil {
		return nil, err
	}
	if block {
		n, err := deviceSize(dev)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "volume stats %s: %v", id, err)
		}
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: n}}}, nil
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return nil, status.Errorf(codes.Internal, "volume stats %s: statfs %s: %v", id, path, err)
	}
	bs := int64(fs.Bsize)
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(fs.Blocks) * bs, Available: int64(fs.Bavail) * bs, Used: int64(fs.Blocks-fs.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(fs.Files), Available: int64(fs.Ffree), Used: int64(fs.Files - fs.Ffree)},
	}}, nil
}

// NodeExpandVolume grows the device to the size the volume's primary now
// serves (after ControllerExpandVolume) and then the file system.
func (d *Driver) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	switch {
	case id == "":
		return nil, status.Error(codes.InvalidArgument, "node expand: a volume ID is needed")
	case path == "":
		return nil, status.Error(codes.InvalidArgument, "node expand: a volume path is needed")
	}
	if c := req.GetVolumeCapability(); c != nil {
		if err := CheckCapability(c); err != nil {
			return nil, err
		}
	}
	release, err := d.lock.acquire(id, "NodeExpandVolume")
	if err != nil {
		return nil, err
	}
	defer release()
	dev, block, err := volumeAt(id, path)
	if err != nil {
		return nil, err
	}
	want := req.GetCapacityRange().GetRequiredBytes()
	served, err := d.servedSize(ctx, id, want)
	if err != nil {
		return nil, err
	}
	cur, err := d.grownDevice(ctx, id, dev, served)
	if err != nil {
		return nil, err
	}
	if !block {
		m, err := mountAt(filepath.Clean(path))
		if err != nil || m == nil {
			return nil, status.Errorf(codes.Internal, "node expand %s: %s is not mounted", id, path)
		}
		if err := growFS(dev, m.FSType, path); err != nil {
			return nil, status.Errorf(codes.Internal, "node expand %s: %v", id, err)
		}
		d.log.Info("csi_fs_grown", "volume", id, "device", dev, "fs_type", m.FSType, "size", cur)
	}
	return &csi.NodeExpandVolumeResponse{CapacityBytes: cur}, nil
}

// servedSize asks the volume's primary (an NBD handshake) what size it
// serves, waiting, bounded, until it serves at least want bytes: the
// servers grow their copies on their next heartbeat after the master's
// expand.
func (d *Driver) servedSize(ctx context.Context, id string, want int64) (int64, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		addr, err := d.resolver(id)(ctx)
		if err != nil {
			return 0, apiStatus("node expand "+id, err)
		}
		size, err := negotiateSize(ctx, addr, id, d.nbdTLS())
		if err == nil && (want <= 0 || size >= want) {
			return size, nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("the primary at %s serves %d bytes, %d asked", addr, size, want)
			}
			return 0, status.Errorf(codes.Unavailable, "node expand %s: %v", id, err)
		}
		select {
		case <-ctx.Done():
			return 0, status.FromContextError(ctx.Err()).Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// grownDevice waits, bounded, until the kernel device is as large as the
// primary serves. NBD fixes the size per connection, so a server that
// grows a volume cuts its NBD clients off; the device's keeper (in this
// process) reconnects, renegotiates and resizes the device.
func (d *Driver) grownDevice(ctx context.Context, id, dev string, served int64) (int64, error) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		cur, err := deviceSize(dev)
		if err != nil {
			return 0, status.Errorf(codes.Internal, "node expand %s: %v", id, err)
		}
		if cur >= served {
			return cur, nil
		}
		if d.stagedOf(id) == nil {
			return 0, status.Errorf(codes.FailedPrecondition,
				"node expand %s: %s has %d bytes, the primary serves %d, and no keeper of this driver process reconnects it (unstage and stage it again)", id, dev, cur, served)
		}
		if time.Now().After(deadline) {
			return 0, status.Errorf(codes.Unavailable, "node expand %s: %s still has %d bytes, the primary serves %d", id, dev, cur, served)
		}
		select {
		case <-ctx.Done():
			return 0, status.FromContextError(ctx.Err()).Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// nbdTLS is the client TLS config of NBD connections to volume servers
// (nil in plain mode).
func (d *Driver) nbdTLS() *tls.Config {
	if d.cfg.TLS == nil {
		return nil
	}
	return d.cfg.TLS.ClientConfig(tlsauth.Expect(tlsauth.KindServer, ""))
}

func negotiateSize(ctx context.Context, addr, id string, tcfg *tls.Config) (int64, error) {
	dl := time.Now().Add(10 * time.Second)
	dctx, cancel := context.WithDeadline(ctx, dl)
	defer cancel()
	c, err := (&net.Dialer{}).DialContext(dctx, "tcp", addr)
	if err != nil {
		return 0, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	_, exp, err := kernel.NegotiateTLS(c, id, dl, tcfg) // plain when tcfg is nil
	if err != nil {
		return 0, fmt.Errorf("negotiate with %s: %w", addr, err)
	}
	return int64(exp.Size), nil
}
