package master

// Prometheus metrics of a master, served at /metrics on its API address.
// Gauges are computed at scrape time from the leader's memory and the
// registry (nothing on the heartbeat path); the promotion counters are
// incremented where a promotion commits. Every name begins with blockd_.

import (
	"net/http"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/blockd/blockd/api"
)

// Promotion kinds (label "kind" of blockd_master_promotions_total).
const (
	promoteAuto   = "auto"   // failover after a lost primary's lease
	promoteManual = "manual" // blockd volume promote
)

type masterMetrics struct {
	m          *Master
	reg        *prometheus.Registry
	promotions *prometheus.CounterVec
	failovers  prometheus.Counter
}

func newMasterMetrics(m *Master, reg *prometheus.Registry) *masterMetrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	mm := &masterMetrics{m: m, reg: reg,
		promotions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "blockd_master_promotions_total",
			Help: "Promotions committed by this master as leader: kind auto (failover) or manual."}, []string{"kind"}),
		failovers: prometheus.NewCounter(prometheus.CounterOpts{Name: "blockd_master_failovers_total",
			Help: "Failovers (automatic promotions after a lost primary) committed by this master as leader."}),
	}
	mm.promotions.WithLabelValues(promoteAuto)
	mm.promotions.WithLabelValues(promoteManual)
	reg.MustRegister(mm.promotions, mm.failovers, mm)
	return mm
}

// promoted counts one committed promotion.
func (mm *masterMetrics) promoted(kind string) {
	if mm == nil {
		return
	}
	mm.promotions.WithLabelValues(kind).Inc()
	if kind == promoteAuto {
		mm.failovers.Inc()
	}
}

func (mm *masterMetrics) handler() http.Handler {
	return promhttp.HandlerFor(mm.reg, promhttp.HandlerOpts{})
}

// Registry is the registry the master's metrics are on (Config.Metrics
// or its own); serve adds the embedded server's to it.
func (m *Master) Registry() *prometheus.Registry { return m.met.reg }

var (
	dRaftState   = desc("blockd_master_raft_state", "1 for this master's raft state.", "state")
	dIsLeader    = desc("blockd_master_is_leader", "1 when this master is the ready leader.")
	dLeader      = desc("blockd_master_leader", "1 for the leader this master knows (label: its API address).", "leader")
	dTerm        = desc("blockd_master_raft_term", "Current raft term.")
	dApplied     = desc("blockd_master_raft_applied_index", "Last raft index applied.")
	dPeers       = desc("blockd_master_raft_peers", "Masters in the raft configuration.")
	dServers     = desc("blockd_master_servers", "Registered volume servers by liveness (leader only).", "alive")
	dVolumes     = desc("blockd_master_volumes", "Volumes by health (leader only).", "health")
	dPending     = desc("blockd_master_failovers_pending", "Failovers armed and waiting for a lost primary's lease (leader only).")
	dQueue       = desc("blockd_master_assignment_queue_depth", "Assignments (volume and server) sent and not yet confirmed by a heartbeat (leader only).")
	dLease       = desc("blockd_master_primary_lease_seconds", "Lease time left of each volume's primary, as the leader granted it (leader only).", "volume", "server")
	dVolFlushOK  = desc("blockd_master_volume_flushes_ok", "1 when a flush of the volume can be acknowledged now (its acting set reaches the durability rule).", "volume")
	dVolDegraded = desc("blockd_master_volume_degraded_replicas", "Replicas of the volume not InSync or outside the acting set.", "volume")
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var raftStates = []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown}

var healths = []string{api.StatusHealthy, api.StatusDegraded, api.StatusPending, api.StatusFailingOver, api.StatusUnavailable, api.StatusFailed}

// Describe sends nothing: the scrape-time metrics are unchecked (their
// label sets follow the volumes).
func (mm *masterMetrics) Describe(chan<- *prometheus.Desc) {}

// Collect reads raft and, on the leader, its live knowledge.
func (mm *masterMetrics) Collect(ch chan<- prometheus.Metric) {
	m := mm.m
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	st := m.raft.State()
	for _, s := range raftStates {
		gauge(dRaftState, b2f(st == s), s.String())
	}
	gauge(dTerm, float64(m.raft.CurrentTerm()))
	gauge(dApplied, float64(m.raft.AppliedIndex()))
	if f := m.raft.GetConfiguration(); f.Error() == nil {
		gauge(dPeers, float64(len(f.Configuration().Servers)))
	}
	if l := m.leaderAPI(); l != "" {
		gauge(dLeader, 1, l)
	}
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	ld := m.ld
	gauge(dIsLeader, b2f(ld != nil))
	if ld == nil {
		return
	}
	alive, dead := 0, 0
	for _, s := range m.serverStates(ld, now) {
		if s.Alive {
			alive++
		} else {
			dead++
		}
	}
	gauge(dServers, float64(alive), "true")
	gauge(dServers, float64(dead), "false")
	byHealth := map[string]int{}
	queue := 0
	for _, v := range m.fsm.volumes() {
		info := m.volumeInfo(ld, v, now)
		byHealth[info.Status]++
		gauge(dVolFlushOK, b2f(info.FlushesOK), v.Name)
		degraded := 0
		for _, r := range info.Replicas {
			if r.State != api.StateInSync || r.Stale {
				degraded++
			}
		}
		gauge(dVolDegraded, float64(degraded), v.Name)
		if v.Primary != "" {
			left := ld.lastSeen(v.Primary).Add(m.cfg.LeaseTTL).Sub(now)
			if ls := ld.servers[v.Primary]; ls == nil {
				left = 0
			}
			gauge(dLease, max(left, 0).Seconds(), v.Name, v.Primary)
		}
		for _, id := range v.Members() {
			if id == "" {
				continue
			}
			role := api.RoleReplica
			if id == v.Primary {
				role = api.RolePrimary
			}
			ls := ld.servers[id]
			if ls == nil {
				queue++
				continue
			}
			if r, ok := ls.reports[v.Name]; !ok || r.Role != role || r.Epoch != v.Epoch {
				queue++
			}
		}
	}
	for _, h := range healths {
		gauge(dVolumes, float64(byHealth[h]), h)
	}
	gauge(dPending, float64(len(ld.pending)))
	gauge(dQueue, float64(queue))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
