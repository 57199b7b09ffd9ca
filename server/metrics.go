package server

// Prometheus metrics of a volume server: per-volume I/O measured by a
// blockdev.Device wrapper around what the frontends serve (the frontends
// and the engine know nothing of Prometheus), and at scrape time the
// engine's counters (blockvol.Stats), the replicas' state and progress
// (replication.ReplicaStatus) and the frontends' counters (nbd.Stats,
// ublk.Stats). Every name begins with blockd_.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/replication"
)

// Operations as labelled in blockd_volume_* I/O metrics.
const (
	opRead  = "read"
	opWrite = "write"
	opFlush = "flush"
	opTrim  = "trim"
	opZero  = "zero"
)

// latencyBuckets (seconds) cover a page-cache read (~10 µs) to a stalled
// replicated flush (seconds).
var latencyBuckets = []float64{0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

type opMeters struct {
	n, bytes, errs prometheus.Counter
	lat            prometheus.Observer
}

func (o *opMeters) done(t0 time.Time, n int64, err error) {
	o.lat.Observe(time.Since(t0).Seconds())
	o.n.Inc()
	if n > 0 {
		o.bytes.Add(float64(n))
	}
	if err != nil {
		o.errs.Inc()
	}
}

// volMeters are one volume's I/O meters, resolved once per volume so the
// I/O path does no label lookup.
type volMeters struct {
	read, write, flush, trim, zero opMeters
}

// meteredDevice measures every request of a frontend on a volume.
type meteredDevice struct {
	blockdev.Device
	m *volMeters
}

func (d *meteredDevice) ReadAt(p []byte, off int64) error {
	t0 := time.Now()
	err := d.Device.ReadAt(p, off)
	d.m.read.done(t0, int64(len(p)), err)
	return err
}

func (d *meteredDevice) WriteAt(p []byte, off int64, fua bool) error {
	t0 := time.Now()
	err := d.Device.WriteAt(p, off, fua)
	d.m.write.done(t0, int64(len(p)), err)
	return err
}

func (d *meteredDevice) Flush() error {
	t0 := time.Now()
	err := d.Device.Flush()
	d.m.flush.done(t0, 0, err)
	return err
}

func (d *meteredDevice) Trim(off, length int64) error {
	t0 := time.Now()
	err := d.Device.Trim(off, length)
	d.m.trim.done(t0, length, err)
	return err
}

func (d *meteredDevice) WriteZeroes(off, length int64, punch bool) error {
	t0 := time.Now()
	err := d.Device.WriteZeroes(off, length, punch)
	d.m.zero.done(t0, length, err)
	return err
}

// serverMetrics is the server's part of a registry.
type serverMetrics struct {
	s    *Server
	reg  *prometheus.Registry
	ctl  *control
	http *http.Server
	ln   net.Listener

	ops, bytes, errs *prometheus.CounterVec
	lat              *prometheus.HistogramVec

	mu   sync.Mutex
	vols map[string]*volMeters
}

func newServerMetrics(s *Server, reg *prometheus.Registry) *serverMetrics {
	l := []string{"volume", "op"}
	m := &serverMetrics{s: s, reg: reg, vols: map[string]*volMeters{},
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "blockd_volume_requests_total",
			Help: "Requests served to frontends (NBD, ublk) per volume and operation."}, l),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "blockd_volume_request_bytes_total",
			Help: "Bytes read, written, trimmed or zeroed per volume and operation."}, l),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "blockd_volume_request_errors_total",
			Help: "Requests that failed per volume and operation."}, l),
		lat: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "blockd_volume_request_duration_seconds",
			Help: "Request latency per volume and operation, as the frontend sees the device.", Buckets: latencyBuckets}, l),
	}
	return m
}

func (m *serverMetrics) register() error {
	for _, c := range []prometheus.Collector{m.ops, m.bytes, m.errs, m.lat, m} {
		if err := m.reg.Register(c); err != nil {
			return fmt.Errorf("server: register metrics: %w", err)
		}
	}
	return nil
}

func (m *serverMetrics) unregister() {
	for _, c := range []prometheus.Collector{m.ops, m.bytes, m.errs, m.lat, m} {
		m.reg.Unregister(c)
	}
}

func (m *serverMetrics) meters(volume string) *volMeters {
	m.mu.Lock()
	defer m.mu.Unlock()
	if v := m.vols[volume]; v != nil {
		return v
	}
	mk := func(op string) opMeters {
		return opMeters{n: m.ops.WithLabelValues(volume, op), bytes: m.bytes.WithLabelValues(volume, op),
			errs: m.errs.WithLabelValues(volume, op), lat: m.lat.WithLabelValues(volume, op)}
	}
	v := &volMeters{read: mk(opRead), write: mk(opWrite), flush: mk(opFlush), trim: mk(opTrim), zero: mk(opZero)}
	m.vols[volume] = v
	return v
}

// forget drops a deleted volume's series.
func (m *serverMetrics) forget(volume string) {
	m.mu.Lock()
	delete(m.vols, volume)
	m.mu.Unlock()
	for _, v := range []interface {
		DeletePartialMatch(prometheus.Labels) int
	}{m.ops, m.bytes, m.errs, m.lat} {
		v.DeletePartialMatch(prometheus.Labels{"volume": volume})
	}
}

// meter wraps dev in the volume's I/O meters (dev itself without metrics).
func (s *Server) meter(volume string, dev blockdev.Device) blockdev.Device {
	if s.met == nil {
		return dev
	}
	return &meteredDevice{Device: dev, m: s.met.meters(volume)}
}

// Registry is the registry the server's metrics are on (nil: metrics off).
func (s *Server) Registry() *prometheus.Registry {
	if s.met == nil {
		return nil
	}
	return s.met.reg
}

// MetricsAddr is the address of the --metrics listener ("" without one).
func (s *Server) MetricsAddr() string {
	if s.met == nil || s.met.ln == nil {
		return ""
	}
	return s.met.ln.Addr().String()
}

// startMetrics registers the metrics (Config.Metrics, or a new registry
// when only MetricsAddr is set) and serves them at MetricsAddr/metrics.
func (s *Server) startMetrics() error {
	reg := s.cfg.Metrics
	if reg == nil && s.cfg.MetricsAddr == "" {
		return nil
	}
	if reg == nil {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	m := newServerMetrics(s, reg)
	m.ctl = s.ctl
	if err := m.register(); err != nil {
		return err
	}
	s.met = m
	if s.cfg.MetricsAddr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", s.cfg.MetricsAddr)
	if err != nil {
		return fmt.Errorf("server: metrics listener: %w", err)
	}
	if s.cfg.TLS != nil {
		// Like the master's API: HTTPS, a certificate of the cluster CA.
		ln = tls.NewListener(ln, s.cfg.TLS.ServerConfig(nil))
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	m.ln, m.http = ln, &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := m.http.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Warn("metrics_listener_stopped", "addr", ln.Addr().String(), "err", err)
		}
	}()
	s.log.Info("metrics_serving", "addr", ln.Addr().String())
	return nil
}

func (s *Server) stopMetrics() {
	m := s.met
	if m == nil {
		return
	}
	if m.http != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = m.http.Shutdown(ctx)
		cancel()
	}
	m.unregister()
}

// ---- scrape-time metrics ----

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	dVolSize     = desc("blockd_volume_size_bytes", "Volume size.", "volume")
	dVolRole     = desc("blockd_volume_role", "1 for the volume's role on this server.", "volume", "role")
	dVolEpoch    = desc("blockd_volume_epoch", "The volume's epoch on this server.", "volume")
	dWALUsed     = desc("blockd_volume_wal_used_bytes", "WAL bytes between the oldest retained and the last completed record.", "volume")
	dWALCap      = desc("blockd_volume_wal_capacity_bytes", "WAL size.", "volume")
	dBackPress   = desc("blockd_volume_back_pressure_waits_total", "Appends that waited for WAL space (the flusher or a retention hold behind).", "volume")
	dRedirects   = desc("blockd_volume_large_writes_total", "Large chunk-aligned writes whose data was written once, outside the WAL.", "volume")
	dRedirectB   = desc("blockd_volume_large_write_bytes_total", "Bytes of those writes.", "volume")
	dRedirectD   = desc("blockd_volume_large_write_direct_bytes_total", "Bytes of those writes written around the page cache (O_DIRECT).", "volume")
	dSettles     = desc("blockd_volume_large_write_settles_total", "Small writes or trims that had to make a large write in their chunk durable first.", "volume")
	dFlushLag    = desc("blockd_volume_flusher_lag_lsns", "Head LSN minus checkpoint LSN: records not yet in the extent.", "volume")
	dHeadLSN     = desc("blockd_volume_head_lsn", "Last LSN assigned.", "volume")
	dDurableLSN  = desc("blockd_volume_durable_lsn", "Last LSN covered by a local fdatasync.", "volume")
	dCkptLSN     = desc("blockd_volume_checkpoint_lsn", "Last LSN in the synced extent.", "volume")
	dBatch       = desc("blockd_volume_group_commit_batch_records", "Records made durable by one WAL fdatasync (group commit).", "volume")
	dSnapshots   = desc("blockd_volume_snapshots", "Snapshots of the volume.", "volume")
	dRepState    = desc("blockd_replica_state", "1 for the replica's state as its primary sees it.", "volume", "replica", "state")
	dRepLag      = desc("blockd_replica_flushed_lsn_lag", "Primary's head LSN minus the replica's FlushedLSN.", "volume", "replica")
	dRepFlushed  = desc("blockd_replica_flushed_lsn", "The replica's FlushedLSN as its primary knows it.", "volume", "replica")
	dRepBarrier  = desc("blockd_replica_barrier_duration_seconds", "Barrier round trip, primary to replica durable answer.", "volume", "replica")
	dRepWAL      = desc("blockd_replica_wal_sent_bytes_total", "Record bytes shipped to the replica (live and catch-up).", "volume", "replica")
	dRepBase     = desc("blockd_replica_base_sent_bytes_total", "Base data bytes of resyncs and rebuilds sent to the replica.", "volume", "replica")
	dRepXfers    = desc("blockd_replica_transfers_total", "Completed resyncs and rebuilds of the replica.", "volume", "replica")
	dXferActive  = desc("blockd_replica_transfer_active", "1 while a catch-up, resync or rebuild of the replica runs.", "volume", "replica", "kind")
	dXferDone    = desc("blockd_replica_transfer_done_bytes", "Bytes done of the transfer in flight (catch-up: WAL bytes sent).", "volume", "replica", "kind")
	dXferTotal   = desc("blockd_replica_transfer_total_bytes", "Bytes to do in all of the transfer in flight (0 for a catch-up: see the LSNs).", "volume", "replica", "kind")
	dXferLSNLeft = desc("blockd_replica_transfer_remaining_lsns", "Records a catch-up has yet to send.", "volume", "replica", "kind")
	dNBDConns    = desc("blockd_nbd_connections", "NBD connections open.")
	dNBDAccepted = desc("blockd_nbd_connections_accepted_total", "NBD connections accepted.")
	dNBDInFlight = desc("blockd_nbd_requests_in_flight", "NBD requests read and not yet answered.")
	dNBDErrors   = desc("blockd_nbd_errors_total", "NBD error replies by errno.", "errno")
	dUblkDevs    = desc("blockd_ublk_devices", "ublk devices hosted by this server.")
	dUblkInF     = desc("blockd_ublk_requests_in_flight", "ublk requests taken from the kernel and not completed.", "volume")
	dUblkErrors  = desc("blockd_ublk_errors_total", "ublk requests completed with an error, by errno.", "volume", "errno")
	dCapacity    = desc("blockd_server_capacity_bytes", "Capacity this server reports to the master.")
	dFree        = desc("blockd_server_free_bytes", "Free bytes of the data filesystem.")
	dVolumes     = desc("blockd_server_volumes", "Volumes hosted by this server.")
)

var replicaStates = []replication.ReplicaState{replication.Disconnected, replication.Connecting, replication.CatchingUp,
	replication.InSync, replication.Degraded, replication.NeedsRebuild, replication.Rebuilding}

var volumeRoles = []replication.Role{replication.RolePrimary, replication.RoleReplica, replication.RoleRebuilding, replication.RoleNone}

// Describe sends nothing: the scrape-time metrics are unchecked (their
// label sets follow the volumes hosted).
func (m *serverMetrics) Describe(chan<- *prometheus.Desc) {}

type snapshotLister interface {
	Snapshots() []blockvol.SnapshotInfo
}

// Collect reads the engine, replication and frontend counters.
func (m *serverMetrics) Collect(ch chan<- prometheus.Metric) {
	s := m.s
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	counter := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, l...)
	}
	total, free := s.capacity()
	gauge(dCapacity, float64(total))
	gauge(dFree, float64(free))

	s.mu.Lock()
	vols := make(map[string]*hosted, len(s.vols))
	for n, h := range s.vols {
		vols[n] = h
	}
	s.mu.Unlock()
	gauge(dVolumes, float64(len(vols)))
	for _, st := range s.host.Status() {
		h := vols[st.Volume]
		if h == nil {
			continue
		}
		name := st.Volume
		es := h.vol.Stats()
		gauge(dVolSize, float64(h.vol.Size()), name)
		for _, r := range volumeRoles {
			gauge(dVolRole, b2f(st.Role == r), name, string(r))
		}
		gauge(dVolEpoch, float64(st.Epoch), name)
		gauge(dWALUsed, float64(es.WALUsedBytes), name)
		gauge(dWALCap, float64(es.WALSizeBytes), name)
		counter(dBackPress, float64(es.BackPressureWaits), name)
		counter(dRedirects, float64(es.RedirectWrites), name)
		counter(dRedirectB, float64(es.RedirectBytes), name)
		counter(dRedirectD, float64(es.RedirectDirectBytes), name)
		counter(dSettles, float64(es.RedirectSettles), name)
		gauge(dFlushLag, float64(es.FlusherLag()), name)
		gauge(dHeadLSN, float64(es.HeadLSN), name)
		gauge(dDurableLSN, float64(es.DurableLSN), name)
		gauge(dCkptLSN, float64(es.CheckpointLSN), name)
		buckets := make(map[float64]uint64, len(blockvol.BatchBuckets))
		var cum uint64
		for i, ub := range blockvol.BatchBuckets {
			cum += es.BatchCounts[i]
			buckets[float64(ub)] = cum
		}
		ch <- prometheus.MustNewConstHistogram(dBatch, es.GroupCommits, float64(es.GroupCommitRecords), buckets, name)
		snaps := 0
		if sl, ok := any(h.vol).(snapshotLister); ok {
			snaps = len(sl.Snapshots())
		}
		gauge(dSnapshots, float64(snaps), name)
		for _, r := range st.Replicas {
			m.collectReplica(ch, name, st.HeadLSN, r)
		}
	}
	if s.nbdSrv != nil {
		ns := s.nbdSrv.Stats()
		gauge(dNBDConns, float64(ns.Connections))
		counter(dNBDAccepted, float64(ns.Accepted))
		gauge(dNBDInFlight, float64(ns.InFlight))
		for errno, n := range ns.Errors {
			counter(dNBDErrors, float64(n), errno)
		}
	}
	m.collectUblk(ch)
}

func (m *serverMetrics) collectReplica(ch chan<- prometheus.Metric, vol string, head uint64, r replication.ReplicaStatus) {
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	counter := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, l...)
	}
	id := r.ServerID
	for _, st := range replicaStates {
		gauge(dRepState, b2f(r.State == st), vol, id, apiState(st))
	}
	lag := uint64(0)
	if head > r.FlushedLSN {
		lag = head - r.FlushedLSN
	}
	gauge(dRepLag, float64(lag), vol, id)
	gauge(dRepFlushed, float64(r.FlushedLSN), vol, id)
	buckets := make(map[float64]uint64, len(replication.BarrierBuckets))
	var cum uint64
	for i, ub := range replication.BarrierBuckets {
		cum += r.Barrier.Counts[i]
		buckets[ub] = cum
	}
	ch <- prometheus.MustNewConstHistogram(dRepBarrier, r.Barrier.Count, r.Barrier.SumSec, buckets, vol, id)
	counter(dRepWAL, float64(r.WALBytes), vol, id)
	counter(dRepBase, float64(r.BaseBytes), vol, id)
	counter(dRepXfers, float64(r.Transfers), vol, id)
	if p := r.Progress; p != nil {
		gauge(dXferActive, 1, vol, id, p.Kind)
		gauge(dXferDone, float64(p.DoneBytes), vol, id, p.Kind)
		gauge(dXferTotal, float64(p.TotalBytes), vol, id, p.Kind)
		left := uint64(0)
		if p.TargetLSN > p.DoneLSN {
			left = p.TargetLSN - p.DoneLSN
		}
		gauge(dXferLSNLeft, float64(left), vol, id, p.Kind)
	}
}

func (m *serverMetrics) collectUblk(ch chan<- prometheus.Metric) {
	c := m.ctl
	if c == nil {
		return
	}
	type dev struct {
		volume string
		st     func() (int64, map[string]uint64)
	}
	c.mu.Lock()
	var devs []dev
	for _, e := range c.devs {
		if d := e.dev; d != nil {
			devs = append(devs, dev{volume: e.volume, st: func() (int64, map[string]uint64) {
				s := d.Stats()
				return s.InFlight, s.Errors
			}})
		}
	}
	c.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(dUblkDevs, prometheus.GaugeValue, float64(len(devs)))
	inflight := map[string]int64{}
	errs := map[string]map[string]uint64{}
	for _, d := range devs {
		n, e := d.st()
		inflight[d.volume] += n
		if errs[d.volume] == nil {
			errs[d.volume] = map[string]uint64{}
		}
		for k, v := range e {
			errs[d.volume][k] += v
		}
	}
	for vol, n := range inflight {
		ch <- prometheus.MustNewConstMetric(dUblkInF, prometheus.GaugeValue, float64(n), vol)
		for errno, v := range errs[vol] {
			ch <- prometheus.MustNewConstMetric(dUblkErrors, prometheus.CounterValue, float64(v), vol, errno)
		}
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// apiProgress is a transfer in flight as a heartbeat reports it.
func apiProgress(p *replication.TransferProgress) *api.TransferProgress {
	if p == nil {
		return nil
	}
	return &api.TransferProgress{Kind: p.Kind, DoneBytes: p.DoneBytes, TotalBytes: p.TotalBytes,
		FromLSN: p.FromLSN, DoneLSN: p.DoneLSN, TargetLSN: p.TargetLSN, ElapsedMS: time.Since(p.Started).Milliseconds()}
}
