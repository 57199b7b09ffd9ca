// Package csi is blockd's Container Storage Interface driver (spec v1.x):
// the identity, controller and node services over gRPC on a unix socket.
// It is a thin layer with no storage logic of its own: the controller
// turns CSI calls into master API calls (api.Client), the node attaches
// volumes through the kernel nbd driver (nbd/kernel, whose keeper runs in
// this process and reconnects a device after a failover), makes a file
// system on a blank device and mounts it.
//
// Volume IDs are blockd volume names (VolumeName); snapshot IDs are
// VOLUME@SNAP (SnapshotID). Snapshots, and volumes made from a snapshot
// or another volume, go to the volume's primary's admin API (snapshot.go,
// clone.go).
package csi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
)

// DriverName is the CSI driver name (CSIDriver object, StorageClass
// provisioner). deploy/kubernetes uses it; a test checks they agree.
const DriverName = "csi.blockd.io"

// Version is reported by GetPluginInfo.
const Version = "0.1.0"

// Modes of the driver process.
const (
	ModeController = "controller"
	ModeNode       = "node"
	ModeBoth       = "both"
)

// Config configures a Driver.
type Config struct {
	// Endpoint is where the gRPC server listens: unix:///path/csi.sock
	// (or a bare path).
	Endpoint string
	// NodeID is this node's ID (NodeGetInfo); required in node mode.
	NodeID string
	// Masters are the master API addresses.
	Masters []string
	// Mode: controller, node or both.
	Mode string
	// NBDConnections per attached device (default 1).
	NBDConnections int
	// AttachWait bounds how long NodeStageVolume waits for the volume's
	// primary to serve it (a just-created volume; default 60s).
	AttachWait time.Duration
	// GiveUp is the keeper's give-up time without a connection (default
	// 5 minutes): then I/O on the device fails instead of hanging.
	GiveUp time.Duration
	// TLS, when set, are this driver's client credentials in a TLS
	// cluster (blockd tls init): the master API, the primaries' admin API
	// (snapshots, clones) and the NBD connections of attached devices all
	// use them, each checking the peer's certificate kind.
	TLS    *tlsauth.Creds
	Logger *slog.Logger
}

// Driver implements the CSI services.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer

	cfg  Config
	mc   *api.Client
	log  *slog.Logger
	lock inflight

	nodeMu sync.Mutex
	staged map[string]*stagedVol // volume ID -> attached device (node mode)

	srv *grpc.Server
}

// New checks the configuration and returns a driver.
func New(cfg Config) (*Driver, error) {
	switch cfg.Mode {
	case "":
		cfg.Mode = ModeBoth
	case ModeController, ModeNode, ModeBoth:
	default:
		return nil, fmt.Errorf("csi: mode %q: want controller, node or both", cfg.Mode)
	}
	if cfg.Endpoint == "" {
		return nil, fmt.Errorf("csi: an endpoint is needed (unix:///csi/csi.sock)")
	}
	if cfg.NodeID == "" && cfg.Mode != ModeController {
		return nil, fmt.Errorf("csi: a node ID is needed in %s mode", cfg.Mode)
	}
	if cfg.NBDConnections <= 0 {
		cfg.NBDConnections = 1
	}
	if cfg.AttachWait <= 0 {
		cfg.AttachWait = time.Minute
	}
	if cfg.GiveUp <= 0 {
		cfg.GiveUp = 5 * time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	mc := api.NewClient(cfg.Masters)
	if cfg.TLS != nil {
		// A master presents a master certificate; blockd serve's embedded
		// master presents its server's.
		mc = api.NewClientTLS(cfg.Masters, cfg.TLS.ClientConfig(tlsauth.AnyOf(tlsauth.KindMaster, tlsauth.KindServer)))
	}
	mc.RetryFor = 20 * time.Second
	return &Driver{cfg: cfg, mc: mc, log: cfg.Logger.With("component", "csi"), staged: map[string]*stagedVol{}}, nil
}

func (d *Driver) controller() bool { return d.cfg.Mode != ModeNode }
func (d *Driver) node() bool       { return d.cfg.Mode != ModeController }

// Listen opens the endpoint's unix socket, replacing a stale one.
func Listen(endpoint string) (net.Listener, error) {
	path := endpoint
	if strings.Contains(endpoint, "://") {
		u, err := url.Parse(endpoint)
		if err != nil {
			return nil, fmt.Errorf("csi: endpoint %q: %w", endpoint, err)
		}
		if u.Scheme != "unix" {
			return nil, fmt.Errorf("csi: endpoint %q: only unix:// sockets are served", endpoint)
		}
		path = u.Path
		if path == "" {
			path = u.Host + u.Opaque
		}
	}
	if path == "" {
		return nil, fmt.Errorf("csi: endpoint %q names no socket path", endpoint)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("csi: endpoint directory: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("csi: remove stale socket %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("csi: listen %s: %w", path, err)
	}
	return l, nil
}

// Run serves on the configured endpoint until ctx ends, then stops the
// gRPC server. Devices this process attached stay connected (the kernel
// holds their sockets, so the pods' I/O goes on across a driver restart
// or upgrade); only their reconnecting keepers end with the process. A
// later driver process finds them by their backend and can unstage them.
func (d *Driver) Run(ctx context.Context) error {
	l, err := Listen(d.cfg.Endpoint)
	if err != nil {
		return err
	}
	return d.Serve(ctx, l)
}

// Serve serves on l until ctx ends.
func (d *Driver) Serve(ctx context.Context, l net.Listener) error {
	d.srv = grpc.NewServer(grpc.UnaryInterceptor(d.logCalls))
	csi.RegisterIdentityServer(d.srv, d)
	if d.controller() {
		csi.RegisterControllerServer(d.srv, d)
	}
	if d.node() {
		csi.RegisterNodeServer(d.srv, d)
	}
	d.log.Info("csi_serving", "endpoint", l.Addr().String(), "mode", d.cfg.Mode, "node_id", d.cfg.NodeID, "driver", DriverName)
	errc := make(chan error, 1)
	go func() { errc <- d.srv.Serve(l) }()
	select {
	case <-ctx.Done():
		d.srv.GracefulStop()
		d.leaveAttached()
		return nil
	case err := <-errc:
		d.leaveAttached()
		return fmt.Errorf("csi: serve: %w", err)
	}
}

// logCalls logs every call's outcome as a structured event.
func (d *Driver) logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	start := time.Now()
	resp, err := h(ctx, req)
	method := info.FullMethod[strings.LastIndex(info.FullMethod, "/")+1:]
	if err != nil {
		d.log.Info("csi_call", "method", method, "code", status.Code(err).String(), "err", err.Error(), "took", time.Since(start).Round(time.Millisecond))
	} else if method != "Probe" && method != "GetPluginInfo" {
		d.log.Debug("csi_call", "method", method, "code", "OK", "took", time.Since(start).Round(time.Millisecond))
	}
	return resp, err
}

// ---- identity ----

// GetPluginInfo names the driver.
func (d *Driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: DriverName, VendorVersion: Version}, nil
}

// GetPluginCapabilities: a controller service (in controller mode) and
// online expansion. No topology: a blockd volume is reachable over the
// network from every node, so it is accessible everywhere.
func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	var caps []*csi.PluginCapability
	if d.controller() {
		caps = append(caps, &csi.PluginCapability{Type: &csi.PluginCapability_Service_{
			Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}}})
	}
	caps = append(caps, &csi.PluginCapability{Type: &csi.PluginCapability_VolumeExpansion_{
		VolumeExpansion: &csi.PluginCapability_VolumeExpansion{Type: csi.PluginCapability_VolumeExpansion_ONLINE}}})
	return &csi.GetPluginCapabilitiesResponse{Capabilities: caps}, nil
}

// Probe is ready when a master answers (controller mode); a node is
// ready at once (it needs the master only to attach).
func (d *Driver) Probe(ctx context.Context, _ *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	if d.controller() {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if _, err := d.mc.Servers(ctx); err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "probe: master %v not reachable: %v", d.mc.Addrs(), err)
		}
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

func wrapInt64(n int64) *wrapperspb.Int64Value {
	if n <= 0 {
		return nil
	}
	return wrapperspb.Int64(n)
}
