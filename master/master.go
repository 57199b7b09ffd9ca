// Package master is blockd's control plane: a raft-replicated registry of
// volumes (size, policy, epoch, primary, replicas) and servers, the
// heartbeat protocol that hands out assignments and leases, automatic
// failover, manual promotion with preflight, placement and presets, and the
// HTTP+JSON API under /v1/ (see package api for the wire contract).
//
// Only the raft leader acts; followers redirect (HTTP 307) to the leader.
// The registry is raft state; heartbeat liveness, capacities and reported
// LSNs are leader memory, rebuilt from heartbeats after a leader change.
package master

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
	"github.com/blockd/blockd/vfs"
)

// Config configures a master.
type Config struct {
	// DataDir holds raft.db (log + stable store), snapshots/ and node-id.
	DataDir string
	// APIAddr is the HTTP listen address ("127.0.0.1:9333"; port 0 picks
	// one). It is also this master's raft server ID in a cluster, so give
	// each master a fixed, reachable API address. "" = do not listen; serve
	// Handler() yourself (single-node only).
	APIAddr string
	// RaftAddr is the raft TCP address. "" with no Peers/Join = an
	// in-memory transport (single-voter, nothing to configure).
	RaftAddr string
	// Bootstrap forms a single-voter cluster on first start. It is implied
	// when neither Peers nor Join is set.
	Bootstrap bool
	// Peers lists every member of a new cluster, this one included, as
	// "APIADDR=RAFTADDR". Each member bootstraps the same configuration.
	Peers []string
	// Join is the API address of any existing member; this master asks the
	// leader to add it (a non-voter first, a voter once it has caught up; it
	// does not bootstrap).
	Join string
	// JoinCatchUpTimeout bounds how long the leader keeps a joining master
	// as a non-voter waiting for it to catch up before it removes it again
	// (default 30s).
	JoinCatchUpTimeout time.Duration
	// OverprovisionPercent is the placement policy for sparse volumes: the
	// sizes plus WALs of the volumes a server holds may add up to this
	// percentage of its capacity (0 = DefaultOverprovisionPercent, 100).
	OverprovisionPercent int
	// LeaseTTL is the primary lease granted by each heartbeat reply
	// (default 5s).
	LeaseTTL time.Duration
	// LeaseMargin is added to LeaseTTL before a lost primary's lease is
	// considered surely expired (default 250ms: clock-rate drift and
	// timer slack; a deposed raft leader steps down (500ms) before a new
	// one is elected (>= 1s), and the new leader counts leases from its start).
	LeaseMargin time.Duration
	// HeartbeatInterval is what servers are told to use (default
	// min(LeaseTTL/5, 500ms)).
	HeartbeatInterval time.Duration
	// MaxLag is the failover lag tolerance in LSNs between the primary's
	// last reported head and a candidate's durable LSN (default 1<<20).
	MaxLag uint64
	// FailGrace: a replica the primary reports Disconnected, Degraded or
	// NeedsRebuild continuously this long leaves the acting set (default
	// 2 heartbeat intervals). A replica silent for LeaseTTL leaves it too.
	FailGrace time.Duration
	// Logger receives every decision (default slog.Default()).
	Logger *slog.Logger
	// TLS, when set, makes the API HTTPS with client certificates
	// required and checked per call, and raft run over mutual TLS between
	// masters (tls.go). nil: plain.
	TLS *tlsauth.Creds
	// Metrics is the registry /metrics serves (metrics.go); nil: one of
	// the master's own, with the Go and process collectors.
	Metrics *prometheus.Registry
}

func (c *Config) setDefaults() {
	if c.LeaseTTL <= 0 {
		c.LeaseTTL = 5 * time.Second
	}
	if c.LeaseMargin <= 0 {
		c.LeaseMargin = 250 * time.Millisecond
	}
	if c.HeartbeatInterval <= 0 {
		c.HeartbeatInterval = c.LeaseTTL / 5
		if c.HeartbeatInterval > 500*time.Millisecond {
			c.HeartbeatInterval = 500 * time.Millisecond
		}
	}
	if c.FailGrace <= 0 {
		c.FailGrace = 2 * c.HeartbeatInterval
	}
	if c.MaxLag == 0 {
		c.MaxLag = 1 << 20
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.JoinCatchUpTimeout <= 0 {
		c.JoinCatchUpTimeout = 30 * time.Second
	}
}

// freshWindow: a server heard from within this is alive and fresh.
func (c *Config) freshWindow() time.Duration {
	w := 4 * c.HeartbeatInterval
	if w < time.Second {
		w = time.Second
	}
	if w > c.LeaseTTL {
		w = c.LeaseTTL
	}
	return w
}

// Master is a running master.
type Master struct {
	cfg  Config
	log  *slog.Logger
	id   string
	fsm  *fsm
	raft *raft.Raft

	store     *raftboltdb.BoltStore
	transport raft.Transport
	netTrans  *raft.NetworkTransport

	ln      net.Listener
	srv     *http.Server
	mounted mountedAPI // a volume server's admin API under /v1/server/ (blockd serve)
	handler http.Handler

	mu sync.Mutex
	ld *leaderState // nil unless this master is the ready leader

	mem membership // raft membership changes (membership.go)
	met *masterMetrics

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// Start opens (or creates) the raft state in cfg.DataDir, starts raft and,
// unless cfg.APIAddr is "", the HTTP API. It returns once the API listens;
// leadership comes later (WaitLeader).
func Start(cfg Config) (*Master, error) {
	cfg.setDefaults()
	if cfg.DataDir == "" {
		return nil, errors.New("master: DataDir is required")
	}
	if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("master: create %s: %w", cfg.DataDir, err)
	}
	m := &Master{cfg: cfg, log: cfg.Logger.With("component", "master"), fsm: &fsm{st: newState()}, stop: make(chan struct{})}
	m.met = newMasterMetrics(m, cfg.Metrics)
	m.handler = m.authorize(m.routes())

	if cfg.APIAddr != "" {
		ln, err := net.Listen("tcp", cfg.APIAddr)
		if err != nil {
			return nil, fmt.Errorf("master: listen api %s: %w", cfg.APIAddr, err)
		}
		m.ln = ln
	}
	if err := m.startRaft(); err != nil {
		if m.ln != nil {
			m.ln.Close()
		}
		return nil, err
	}
	if m.ln != nil {
		m.srv = &http.Server{Handler: m.handler, ReadHeaderTimeout: 10 * time.Second, ErrorLog: tlsErrorLog(m.log)}
		go func() {
			if err := m.srv.Serve(m.apiTLS(m.ln)); err != nil && !errors.Is(err, http.ErrServerClosed) {
				m.log.Error("api_serve_failed", "err", err)
			}
		}()
	}
	m.wg.Add(1)
	go m.monitor()
	if m.netTrans != nil {
		m.wg.Add(1)
		go m.reconcileMembers()
	}
	if cfg.Join != "" {
		m.wg.Add(1)
		go m.join()
	}
	m.log.Info("master_started", "id", m.id, "api", m.APIAddr(), "raft", cfg.RaftAddr, "lease_ttl", cfg.LeaseTTL, "heartbeat_interval", cfg.HeartbeatInterval)
	return m, nil
}

func parsePeer(p string) (id, raftAddr string, err error) {
	i := strings.LastIndex(p, "=")
	if i <= 0 || i == len(p)-1 {
		return "", "", fmt.Errorf("master: peer %q: want APIADDR=RAFTADDR", p)
	}
	return p[:i], p[i+1:], nil
}

func (m *Master) startRaft() error {
	cfg := m.cfg
	single := len(cfg.Peers) == 0 && cfg.Join == ""

	// The raft ID: the API address (cluster) or, single-node, whatever was
	// persisted the first time (so a port change keeps the membership).
	idFile := filepath.Join(cfg.DataDir, "node-id")
	id := ""
	if m.ln != nil {
		id = m.ln.Addr().String()
		if cfg.APIAddr != "" && !strings.HasSuffix(cfg.APIAddr, ":0") {
			id = cfg.APIAddr
		}
	}
	if b, err := os.ReadFile(idFile); err == nil && strings.TrimSpace(string(b)) != "" {
		if old := strings.TrimSpace(string(b)); single || old == id {
			id = old
		} else {
			m.log.Warn("master_id_changed", "old", old, "new", id)
		}
	}
	if id == "" {
		id = "master"
	}
	if err := vfs.WriteFileAtomic(vfs.Default, idFile, []byte(id+"\n"), 0o644); err != nil {
		return fmt.Errorf("master: write %s: %w", idFile, err)
	}
	m.id = id

	var peers []raft.Server
	selfListed := false
	for _, p := range cfg.Peers {
		pid, paddr, err := parsePeer(p)
		if err != nil {
			return err
		}
		selfListed = selfListed || pid == id
		peers = append(peers, raft.Server{ID: raft.ServerID(pid), Address: raft.ServerAddress(paddr)})
	}
	if len(peers) > 0 && !selfListed {
		return fmt.Errorf("master: --peers must list this master as %s=RAFTADDR (its API address is its raft ID)", id)
	}

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(id)
	rc.Logger = hclog.New(&hclog.LoggerOptions{Name: "raft", Level: hclog.Warn, Output: &slogWriter{log: m.log}})
	if single && cfg.RaftAddr == "" {
		// One voter on an in-memory transport, for good (serve): no other
		// master can ever be elected, so there is nothing to wait a
		// second for before electing itself.
		rc.HeartbeatTimeout, rc.ElectionTimeout, rc.LeaderLeaseTimeout = 100*time.Millisecond, 100*time.Millisecond, 100*time.Millisecond
	}

	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(cfg.DataDir, "raft.db")})
	if err != nil {
		return fmt.Errorf("master: open raft.db: %w", err)
	}
	m.store = store
	logs, err := raft.NewLogCache(256, store)
	if err != nil {
		store.Close()
		return fmt.Errorf("master: log cache: %w", err)
	}
	snaps, err := raft.NewFileSnapshotStore(cfg.DataDir, 2, &slogWriter{log: m.log})
	if err != nil {
		store.Close()
		return fmt.Errorf("master: snapshot store: %w", err)
	}

	var self raft.ServerAddress
	if single && cfg.RaftAddr == "" {
		addr, tr := raft.NewInmemTransport("inmem")
		m.transport, self = tr, addr
	} else {
		if cfg.RaftAddr == "" {
			store.Close()
			return errors.New("master: RaftAddr is required with Peers or Join")
		}
		tcpAddr, err := net.ResolveTCPAddr("tcp", cfg.RaftAddr)
		if err != nil {
			store.Close()
			return fmt.Errorf("master: raft addr %s: %w", cfg.RaftAddr, err)
		}
		nt, err := m.raftTransport(cfg.RaftAddr, tcpAddr)
		if err != nil {
			store.Close()
			return fmt.Errorf("master: raft transport %s: %w", cfg.RaftAddr, err)
		}
		m.netTrans, m.transport, self = nt, nt, nt.LocalAddr()
	}

	if err := m.recoverConfiguration(rc, logs, store, snaps, self, single); err != nil {
		m.closeTransport()
		store.Close()
		return err
	}
	r, err := raft.NewRaft(rc, m.fsm, logs, store, snaps, m.transport)
	if err != nil {
		m.closeTransport()
		store.Close()
		return fmt.Errorf("master: start raft: %w", err)
	}
	m.raft = r

	fail := func(err error) error {
		_ = r.Shutdown().Error()
		m.closeTransport()
		store.Close()
		m.raft = nil
		return err
	}
	has, err := raft.HasExistingState(logs, store, snaps)
	if err != nil {
		return fail(fmt.Errorf("master: inspect raft state: %w", err))
	}
	if !has && cfg.Join == "" {
		conf := raft.Configuration{Servers: peers}
		if single {
			conf.Servers = []raft.Server{{ID: rc.LocalID, Address: self}}
		}
		if err := r.BootstrapCluster(conf).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			return fail(fmt.Errorf("master: bootstrap: %w", err))
		}
		m.log.Info("raft_bootstrapped", "servers", len(conf.Servers))
	}
	return nil
}

func (m *Master) closeTransport() {
	if m.netTrans != nil {
		m.netTrans.Close()
	}
}

// join asks an existing member to add this master until the leader accepts
// it (as a non-voter catching up, or as a voter already), then follows the
// promotion in its own copy of the configuration.
func (m *Master) join() {
	defer m.wg.Done()
	c := m.apiClient(api.ParseAddrs(m.cfg.Join))
	stopCtx, stopCancel := context.WithCancel(context.Background())
	defer stopCancel()
	go func() {
		select {
		case <-m.stop:
			stopCancel()
		case <-stopCtx.Done():
		}
	}()
	for {
		ctx, cancel := context.WithTimeout(stopCtx, 10*time.Second)
		resp, err := c.JoinMaster(ctx, api.JoinRequest{ID: m.id, RaftAddr: m.cfg.RaftAddr})
		cancel()
		if err == nil {
			m.log.Info("raft_join_accepted", "via", m.cfg.Join, "id", m.id, "suffrage", resp.Suffrage)
			break
		}
		wait := time.Second
		if api.IsCode(err, api.CodeMemberConflict) || api.IsCode(err, api.CodeJoinUnsupported) ||
			api.IsCode(err, api.CodeRaftUnreachable) || api.IsCode(err, api.CodeBadRequest) || api.IsCode(err, api.CodeJoinerNotFresh) {
			wait = 10 * time.Second // refused: retry slowly, until an operator fixes it
			m.log.Error("raft_join_refused", "via", m.cfg.Join, "id", m.id, "retry_in", wait, "err", err)
		} else {
			m.log.Warn("raft_join_retry", "via", m.cfg.Join, "err", err)
		}
		select {
		case <-m.stop:
			return
		case <-time.After(wait):
		}
	}
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		if ms, _, err := m.configuration(); err == nil {
			for _, mb := range ms {
				if mb.ID == m.id && mb.Voter {
					m.log.Info("raft_joined", "via", m.cfg.Join, "id", m.id, "suffrage", api.SuffrageVoter)
					return
				}
			}
		}
		select {
		case <-m.stop:
			return
		case <-t.C:
		}
	}
}

// ID returns this master's raft server ID.
func (m *Master) ID() string { return m.id }

// APIAddr returns the address the API listens on ("" if it does not listen).
func (m *Master) APIAddr() string {
	if m.ln == nil {
		return ""
	}
	return m.ln.Addr().String()
}

// Handler returns the HTTP API (to mount in another server when APIAddr is "").
func (m *Master) Handler() http.Handler { return m.handler }

// IsLeader reports whether this master is the leader and ready to act.
func (m *Master) IsLeader() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ld != nil
}

// WaitLeader waits until this master is the ready leader.
func (m *Master) WaitLeader(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !m.IsLeader() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("master: wait for leadership: %w", ctx.Err())
		case <-t.C:
		}
	}
	return nil
}

// Close stops the API and raft. Safe to call twice.
func (m *Master) Close() error {
	var err error
	m.closeOnce.Do(func() {
		close(m.stop)
		if m.srv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = m.srv.Shutdown(ctx)
			cancel()
			m.srv.Close()
		}
		m.wg.Wait()
		m.mu.Lock()
		if m.ld != nil {
			m.ld.stopTimers()
			m.ld = nil
		}
		m.mu.Unlock()
		if m.raft != nil {
			if e := m.raft.Shutdown().Error(); e != nil {
				err = fmt.Errorf("master: raft shutdown: %w", e)
			}
		}
		m.closeTransport()
		if m.store != nil {
			if e := m.store.Close(); e != nil && err == nil {
				err = fmt.Errorf("master: close raft.db: %w", e)
			}
		}
		m.log.Info("master_stopped", "id", m.id)
	})
	return err
}

// leaderAPI returns the leader's API address ("" if unknown).
func (m *Master) leaderAPI() string {
	_, id := m.raft.LeaderWithID()
	return string(id)
}

// apply submits a command through raft and returns the FSM's result.
func (m *Master) apply(c command) *applyResult {
	data, err := jsonMarshal(c)
	if err != nil {
		return &applyResult{Err: api.Errorf(api.CodeInternal, "encode command: %v", err)}
	}
	f := m.raft.Apply(data, 10*time.Second)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) || errors.Is(err, raft.ErrLeadershipTransferInProgress) || errors.Is(err, raft.ErrRaftShutdown) {
			return &applyResult{Err: &api.Error{Code: api.CodeNotLeader, Message: err.Error(), Leader: m.leaderAPI(), Status: http.StatusServiceUnavailable}}
		}
		return &applyResult{Err: api.Errorf(api.CodeInternal, "raft apply %s: %v", c.Op, err)}
	}
	res, ok := f.Response().(*applyResult)
	if !ok {
		return &applyResult{Err: api.Errorf(api.CodeInternal, "raft apply %s: unexpected response %T", c.Op, f.Response())}
	}
	return res
}

// monitor follows leadership changes and drives failover.
func (m *Master) monitor() {
	defer m.wg.Done()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-tick.C:
		}
		isLeader := m.raft.State() == raft.Leader
		m.mu.Lock()
		ld := m.ld
		m.mu.Unlock()
		switch {
		case isLeader && ld == nil:
			// Catch the FSM up with everything committed before acting.
			if err := m.raft.Barrier(5 * time.Second).Error(); err != nil {
				m.log.Warn("leader_barrier_failed", "err", err)
				continue
			}
			nl := newLeaderState(time.Now())
			// Honour lease fences of promotions made by a previous leader.
			for _, v := range m.fsm.volumes() {
				if d := time.Until(time.UnixMilli(v.LeaseFenceUnixMS)); v.LeaseFenceUnixMS > 0 && d > 0 {
					nl.leaseNotBefore[v.Name] = nl.since.Add(d)
					m.log.Info("lease_fence_inherited", "volume", v.Name, "epoch", v.Epoch, "primary", v.Primary, "wait_ms", d.Milliseconds())
				}
			}
			m.mu.Lock()
			m.ld = nl
			m.mu.Unlock()
			m.log.Info("leader_elected", "id", m.id, "volumes", len(m.fsm.volumes()),
				"lease_wait_ms", (m.cfg.LeaseTTL + m.cfg.LeaseMargin).Milliseconds())
		case !isLeader && ld != nil:
			m.mu.Lock()
			m.ld.stopTimers()
			m.ld = nil
			m.mu.Unlock()
			m.log.Info("leadership_lost", "id", m.id, "leader", m.leaderAPI())
		case isLeader:
			m.sweep(time.Now())
			m.actingSweep(time.Now())
			m.expandSweep(time.Now())
		}
	}
}

// slogWriter turns raft's log lines into slog records.
type slogWriter struct{ log *slog.Logger }

func (w *slogWriter) Write(p []byte) (int, error) {
	sc := bufio.NewScanner(strings.NewReader(string(p)))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "":
		case strings.Contains(line, "[ERROR]"):
			w.log.Error("raft", "line", line)
		case strings.Contains(line, "[WARN]"):
			w.log.Warn("raft", "line", line)
		default:
			w.log.Info("raft", "line", line)
		}
	}
	return len(p), nil
}

var _ io.Writer = (*slogWriter)(nil)
