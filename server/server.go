// Package server is the volume-server daemon. It hosts volumes (blockvol),
// heartbeats to the master (api), applies the assignments the master
// replies with (role, epoch, lease, replica set), exports primaries over
// NBD (nbd) and runs replication (replication) in both directions.
//
// The master authorises; the server only acts on what it was told, and
// refuses writes as soon as its lease for the current epoch runs out.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/nbd"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/tlsauth"
	"github.com/blockd/blockd/vfs"
)

// Config configures a volume server.
type Config struct {
	// DataDir holds LOCK, server-id and volumes/NAME/ for each volume.
	DataDir string
	// ServerID is the stable identity the master knows this server by.
	// Empty: the ID stored in DataDir, or a new one saved there.
	ServerID string
	// Listen is the replication/control address replicas are reached at.
	Listen string
	// AdvertiseAddr / AdvertiseNBD are reported to the master when the
	// listen addresses are not reachable as written (e.g. 0.0.0.0).
	AdvertiseAddr string
	AdvertiseNBD  string
	// NBD is the NBD listen address: host:port, or unix:/path.
	NBD string
	// DeferNBD binds the NBD address at once but answers clients only
	// after StartNBD: `blockd serve` calls it once its volume exists, so
	// an early client waits in the listen backlog instead of being told
	// the volume is unknown.
	DeferNBD bool
	// Masters are the master API addresses.
	Masters []string
	// CapacityBytes overrides the capacity reported (0 = the filesystem's).
	CapacityBytes int64
	Logger        *slog.Logger
	FS            vfs.FS
	// ControlSocket is the local control endpoint (ublk devices hosted by
	// this server); default DataDir/control.sock.
	ControlSocket string
	// UblkRecoveryWait is how long a restarted server waits for the volume
	// of a ublk device recorded by an earlier run to be primary here before
	// it takes the device over with every request failing (EPERM) rather
	// than leaving it queued. 0 means 90 s.
	UblkRecoveryWait time.Duration
	// DirectIO writes large writes' data around the page cache
	// (blockvol.Options.DirectIO) on every volume this server hosts.
	DirectIO bool
	// TLS, when set, secures NBD (STARTTLS required), replication (mutual
	// TLS, certificates checked against server IDs) and heartbeats
	// (tls.go). Its certificate must name ServerID.
	TLS *tlsauth.Creds
	// HTTP is the admin API's listen address (httpapi.go); "" serves none
	// (blockd serve mounts HTTPHandler on its master's listener instead
	// and reports that address as AdvertiseHTTP).
	HTTP          string
	AdvertiseHTTP string
	// EmbeddedMaster: the master runs in this process and presents this
	// server's own certificate (blockd serve), which the heartbeat client
	// then accepts besides a master's.
	EmbeddedMaster bool
	// Metrics, when set, gets this server's metrics (metrics.go): I/O per
	// volume, engine, replicas, NBD and ublk. nil with no MetricsAddr: no
	// metrics, and I/O is not measured.
	Metrics *prometheus.Registry
	// MetricsAddr, when set, serves the metrics at http://ADDR/metrics
	// (on Metrics, or on a registry of its own); with TLS, https:// and a
	// client certificate of the cluster CA, as the master's API.
	MetricsAddr string
}

// Server is a running volume server.
type Server struct {
	cfg    Config
	log    *slog.Logger
	lock   *DirLock
	client *api.Client

	nbdSrv  *nbd.Server
	nbdLn   net.Listener
	replLn  net.Listener
	httpLn  net.Listener // the admin API (httpapi.go), nil without Config.HTTP
	httpSrv *http.Server
	host    *replication.Host // roles, epochs, leases and replication of every volume
	ctl     *control          // the control endpoint: set in New, cleared by Close
	started time.Time
	fails   volumeFailures // assigned volumes that cannot be created or opened (assign.go)
	peers   peerIDs        // replica server IDs by address, for the TLS dialer (tls.go)
	met     *serverMetrics // nil: metrics off (metrics.go)

	mu   sync.Mutex
	vols map[string]*hosted
	// dropping names the deleted volumes whose files are still being
	// removed (drop, assign.go); dropWG waits for those removals.
	dropping map[string]bool
	dropWG   sync.WaitGroup
	// hbInterval is the master's requested heartbeat period.
	hbInterval time.Duration
	lastHB     time.Time

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New takes the data directory's lock, opens the volumes found there and
// starts the listeners, the replication receiver and the heartbeat loop.
func New(cfg Config) (*Server, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("server: no data directory")
	}
	if len(cfg.Masters) == 0 {
		return nil, errors.New("server: no master address")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.FS == nil {
		cfg.FS = vfs.Default
	}
	lock, err := LockDir(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, lock: lock, vols: map[string]*hosted{},
		hbInterval: 500 * time.Millisecond, started: time.Now()}
	ok := false
	defer func() {
		if !ok {
			s.closeAll()
		}
	}()
	if s.cfg.ServerID, err = serverID(cfg.FS, cfg.DataDir, cfg.ServerID); err != nil {
		return nil, err
	}
	if err := checkTLSIdentity(cfg.TLS, s.cfg.ServerID); err != nil {
		return nil, err
	}
	s.client = s.masterClient()
	s.log = cfg.Logger.With("server", s.cfg.ServerID)
	pcfg := replication.PrimaryConfig{FS: cfg.FS}
	if cfg.TLS != nil {
		pcfg.Dial = s.replDial
	}
	s.host = replication.NewHost(replication.HostConfig{ServerID: s.cfg.ServerID, Logger: s.log, Primary: pcfg})
	if err := cfg.FS.MkdirAll(s.volumesDir(), 0o755); err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	if err := s.openExisting(); err != nil {
		return nil, err
	}

	if s.replLn, err = net.Listen("tcp", orDefault(cfg.Listen, "127.0.0.1:0")); err != nil {
		return nil, fmt.Errorf("server: replication listener: %w", err)
	}
	if s.nbdLn, err = listenNBD(orDefault(cfg.NBD, "127.0.0.1:10809")); err != nil {
		return nil, fmt.Errorf("server: NBD listener: %w", err)
	}
	nopts := []nbd.Option{nbd.WithLogger(s.log)}
	if cfg.TLS != nil {
		nopts = append(nopts, nbd.WithTLS(cfg.TLS.ServerConfig(nil)), nbd.WithPeerName(peerName))
	}
	s.nbdSrv = nbd.NewServer(exports{s}, nopts...)
	if err := s.startHTTP(); err != nil {
		return nil, err
	}

	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.wg.Add(2)
	go func() { defer s.wg.Done(); _ = s.host.Serve(s.replListener(s.replLn)) }()
	if !cfg.DeferNBD {
		s.StartNBD()
	}
	go func() { defer s.wg.Done(); s.heartbeatLoop() }()
	if err := s.startControl(); err != nil {
		ok = true // Close stops what was started and releases the rest
		_ = s.Close()
		return nil, err
	}
	if err := s.startMetrics(); err != nil {
		ok = true
		_ = s.Close()
		return nil, err
	}
	ok = true
	s.log.Info("server_started", "nbd", s.NBDAddr(), "addr", s.Addr(), "http", s.HTTPAddr(), "data", cfg.DataDir)
	return s, nil
}

// StartNBD starts answering NBD clients (see Config.DeferNBD). It is
// called once.
func (s *Server) StartNBD() {
	s.wg.Add(1)
	go func() { defer s.wg.Done(); _ = s.nbdSrv.Serve(s.nbdLn) }()
}

// ID is the server's stable identity.
func (s *Server) ID() string { return s.cfg.ServerID }

// Addr is the replication address reported to the master.
func (s *Server) Addr() string {
	if s.cfg.AdvertiseAddr != "" {
		return s.cfg.AdvertiseAddr
	}
	return s.replLn.Addr().String()
}

// NBDAddr is the NBD address reported to the master and printed for users.
func (s *Server) NBDAddr() string {
	if s.cfg.AdvertiseNBD != "" {
		return s.cfg.AdvertiseNBD
	}
	if s.nbdLn.Addr().Network() == "unix" {
		return "unix:" + s.nbdLn.Addr().String()
	}
	return s.nbdLn.Addr().String()
}

// Close stops serving: no new NBD connections, in-flight requests drained,
// every volume flushed and closed. It is what SIGTERM does.
func (s *Server) Close() error {
	s.stopMetrics()
	s.stopControl()
	s.stopHTTP()
	if s.cancel != nil {
		s.cancel()
	}
	var errs []error
	if s.nbdSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := s.nbdSrv.Shutdown(ctx); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			errs = append(errs, fmt.Errorf("nbd shutdown: %w", err))
		}
		cancel()
	}
	if s.host != nil {
		_ = s.host.Close()
	}
	s.wg.Wait()
	s.dropWG.Wait()
	errs = append(errs, s.closeAll())
	return errors.Join(errs...)
}

func (s *Server) closeAll() error {
	var errs []error
	s.mu.Lock()
	vols := s.vols
	s.vols = map[string]*hosted{}
	s.mu.Unlock()
	for _, h := range vols {
		if err := h.close(); err != nil {
			errs = append(errs, err)
		}
	}
	if s.nbdLn != nil {
		_ = s.nbdLn.Close()
	}
	if s.replLn != nil {
		_ = s.replLn.Close()
	}
	s.lock.Release()
	return errors.Join(errs...)
}

func (s *Server) volumesDir() string { return filepath.Join(s.cfg.DataDir, "volumes") }

func listenNBD(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		_ = os.Remove(path) // a socket left by a killed server
		return net.Listen("unix", path)
	}
	return net.Listen("tcp", addr)
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// serverID returns the configured ID, or the one stored in dir, or a new
// one it stores there durably (a server that came back from a power cut
// under a new identity would be a stranger to the master). A stored ID that
// differs from a configured one is an error: the data belongs to another
// server identity.
func serverID(fsys vfs.FS, dir, configured string) (string, error) {
	path := filepath.Join(dir, "server-id")
	b, err := vfs.ReadFile(fsys, path)
	stored := strings.TrimSpace(string(b))
	switch {
	case err == nil && stored != "" && configured != "" && stored != configured:
		return "", fmt.Errorf("server: data directory %s belongs to server %q, not %q", dir, stored, configured)
	case err == nil && stored != "":
		return stored, nil
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("server: read server id: %w", err)
	}
	id := configured
	if id == "" {
		h, _ := os.Hostname()
		id = fmt.Sprintf("%s-%d", strings.SplitN(h, ".", 2)[0], time.Now().UnixNano()%1e6)
	}
	if err := vfs.WriteFileAtomic(fsys, path, []byte(id+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("server: save server id: %w", err)
	}
	return id, nil
}

// capacity reports the data filesystem's total and free bytes.
func (s *Server) capacity() (total, free int64) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.cfg.DataDir, &st); err == nil {
		total, free = int64(st.Blocks)*st.Bsize, int64(st.Bavail)*st.Bsize
	}
	if s.cfg.CapacityBytes > 0 {
		total = s.cfg.CapacityBytes
		if free > total {
			free = total
		}
	}
	return total, free
}
