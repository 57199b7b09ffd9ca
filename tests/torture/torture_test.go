package torture

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/vfs"
)

// fault is one kind of event the schedule can cause.
type fault string

const (
	faultKillPrimary   fault = "kill_primary"    // kill -9 of the primary; restart after the failover
	faultKillReplica   fault = "kill_replica"    // kill -9 of a replica, restart
	faultSlowReplica   fault = "slow_replica"    // delay on a replica's replication link
	faultReaddress     fault = "readdress"       // kill -9 of the primary, restart on new ports
	faultPromoteRace   fault = "promote_race"    // kill -9 of the primary, an explicit promote racing the auto failover
	faultIsolatePrimry fault = "isolate_primary" // cut the primary's link to the master (proxy), heal after the failover
	faultFullDisk      fault = "full_disk"       // restart a replica on a disk that fills up (ENOSPC from vfs.ErrorFS), then normally
	faultBadDisk       fault = "bad_disk"        // restart a replica on a disk with EIO on fsync or slow fsyncs (vfs.ErrorFS), then normally
	faultPartition     fault = "partition"       // the primary's only link down (network namespaces): cut from master, replicas and clients
	faultKillLeader    fault = "kill_leader"     // kill -9 of the master leader under load; restart it after a new leader is elected
	faultLeaderPrimary fault = "leader_primary"  // kill -9 of the master leader, then of the primary: the failover happens while the old leader is down
	faultReconnect     fault = "reconnect"       // NBD clients open and close connections in a tight loop while the others write
)

type tortureConfig struct {
	seed       int64
	failovers  int           // stop once this many failovers happened
	budget     time.Duration // ...or once the schedule ran this long
	clients    int
	blocks     int64
	leaseTTL   time.Duration
	rf         int
	durability string
	masters    int // 1 or 3 (a raft cluster); TORTURE_MASTERS overrides
	faults     []fault
	weights    []int
}

// failover is one change of primary the schedule caused.
type failover struct {
	fault       fault
	from, to    string
	killAt      int64 // recorder time of the fault
	promotedAt  int64 // recorder time the master named the new primary
	writeOutage time.Duration
	flushOutage time.Duration
}

type tortureStats struct {
	kills, isolations, slowLinks, readdresses, promotes, fullDisks int
	killsBy                                                        map[string]int // primary, replica, leader
	failovers                                                      []failover
	leaderKills                                                    []leaderKill
	storms                                                         int
	stormConns                                                     int64
	notes                                                          []string
}

func seedFromEnv(t *testing.T, def int64) int64 {
	if s := os.Getenv("TORTURE_SEED"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("TORTURE_SEED=%q: %v", s, err)
		}
		return v
	}
	return def
}

// TestTortureShort is the torture run of `go test ./...`: kill -9 of the
// primary or a replica of an RF=3 sync_all volume under load, the primary
// cut off from the master, a slow replica link; at least 10 failovers,
// then porcupine checks the history. TORTURE_SEED replays a schedule.
func TestTortureShort(t *testing.T) {
	if os.Getenv("TORTURE_LONG") != "" {
		t.Skip("TORTURE_LONG is set: TestTortureLong runs instead")
	}
	cfg := tortureConfig{
		seed:      seedFromEnv(t, time.Now().UnixNano()%1000000),
		failovers: 10,
		budget:    200 * time.Second,
		clients:   4,
		blocks:    32,
		leaseTTL:  2 * time.Second,
		masters:   3,
		faults:    []fault{faultKillPrimary, faultKillReplica, faultIsolatePrimry, faultSlowReplica, faultKillLeader, faultLeaderPrimary, faultReconnect},
		weights:   []int{4, 1, 1, 1, 1, 1, 1},
	}
	runTorture(t, cfg)
}

// TestTortureLong is `make torture` (TORTURE_LONG=1): at least 100
// failovers and more fault kinds.
func TestTortureLong(t *testing.T) {
	if os.Getenv("TORTURE_LONG") == "" {
		t.Skip("set TORTURE_LONG=1 (make torture) for the long run")
	}
	n := 100
	if s := os.Getenv("TORTURE_FAILOVERS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("TORTURE_FAILOVERS=%q: %v", s, err)
		}
		n = v
	}
	cfg := tortureConfig{
		seed:      seedFromEnv(t, time.Now().UnixNano()%1000000),
		failovers: n,
		budget:    time.Duration(n) * 25 * time.Second,
		clients:   6,
		blocks:    48,
		leaseTTL:  2 * time.Second,
		masters:   3,
		faults: []fault{faultKillPrimary, faultKillReplica, faultSlowReplica, faultReaddress, faultPromoteRace, faultIsolatePrimry, faultFullDisk, faultBadDisk,
			faultKillLeader, faultLeaderPrimary, faultReconnect},
		weights: []int{4, 2, 2, 2, 2, 2, 1, 1, 2, 2, 2},
	}
	runTorture(t, cfg)
}

func runTorture(t *testing.T, cfg tortureConfig) {
	if s := os.Getenv("TORTURE_FAULTS"); s != "" {
		// Only these fault kinds, equally weighted (to chase one).
		cfg.faults, cfg.weights = nil, nil
		for _, f := range strings.Split(s, ",") {
			cfg.faults = append(cfg.faults, fault(strings.TrimSpace(f)))
			cfg.weights = append(cfg.weights, 1)
		}
	}
	known := map[fault]bool{faultKillPrimary: true, faultKillReplica: true, faultSlowReplica: true, faultReaddress: true,
		faultPromoteRace: true, faultIsolatePrimry: true, faultFullDisk: true, faultBadDisk: true, faultPartition: true,
		faultKillLeader: true, faultLeaderPrimary: true, faultReconnect: true}
	if s := os.Getenv("TORTURE_MASTERS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || (n != 1 && n != 3) {
			t.Fatalf("TORTURE_MASTERS=%q: want 1 or 3", s)
		}
		cfg.masters = n
	}
	if cfg.masters == 0 {
		cfg.masters = 1
	}
	if cfg.masters == 1 {
		// No leader to kill with one master.
		var fs []fault
		var ws []int
		for i, f := range cfg.faults {
			if f != faultKillLeader && f != faultLeaderPrimary {
				fs, ws = append(fs, f), append(ws, cfg.weights[i])
			}
		}
		cfg.faults, cfg.weights = fs, ws
	}
	for _, f := range cfg.faults {
		if !known[f] {
			t.Fatalf("unknown fault kind %q", f)
		}
	}
	t.Logf("TORTURE seed %d (replay with TORTURE_SEED=%d)", cfg.seed, cfg.seed)
	rng := rand.New(rand.NewSource(cfg.seed))
	c := newCluster(t)
	ids := []string{"s1", "s2", "s3"}
	if mode := os.Getenv("TORTURE_NETNS"); mode != "" {
		// Real partitions: each server in its own network namespace
		// (the proxies of the other faults listen on the bridge). "auto"
		// falls back to loopback where namespaces cannot be made.
		err := netLabAvailable()
		switch {
		case err != nil && mode == "auto":
			t.Logf("TORTURE_NETNS=auto: no network namespaces (%v): proxies only", err)
		case err != nil:
			t.Fatalf("TORTURE_NETNS needs root and ip(8): %v", err)
		default:
			c.lab = newNetLab(t, ids)
		}
	}
	if c.lab != nil {
		cfg.faults = append(cfg.faults, faultPartition)
		cfg.weights = append(cfg.weights, 3)
	}
	c.startMasters(cfg.masters, cfg.leaseTTL)
	for _, id := range ids {
		c.addServer(id, true)
		c.server(id).start(t)
	}
	c.waitFor("servers registered", 60*time.Second, func() error {
		srvs, err := c.client.Servers(context.Background())
		if err != nil {
			return err
		}
		alive := 0
		for _, s := range srvs {
			if s.Alive {
				alive++
			}
		}
		if alive < len(ids) {
			return fmt.Errorf("%d of %d servers alive", alive, len(ids))
		}
		return nil
	})
	const vol = "tv"
	if cfg.rf == 0 {
		cfg.rf, cfg.durability = 3, "sync_all"
	}
	if s := os.Getenv("TORTURE_VOLUME"); s != "" {
		// RF,DURABILITY: e.g. 3,sync_quorum or 2,sync_all.
		rf, d, ok := strings.Cut(s, ",")
		n, err := strconv.Atoi(rf)
		if !ok || err != nil || n < 2 || n > 3 {
			t.Fatalf("TORTURE_VOLUME=%q: want RF,DURABILITY with RF 2 or 3", s)
		}
		cfg.rf, cfg.durability = n, d
	}
	t.Logf("volume RF=%d %s", cfg.rf, cfg.durability)
	if out, err := c.cli("volume", "create", vol, "--size", "16MiB", "--rf", strconv.Itoa(cfg.rf), "--durability", cfg.durability); err != nil {
		t.Fatalf("create: %v\n%s", err, out)
	}
	c.waitFor(vol+" healthy", 60*time.Second, func() error { return c.healthy(vol) })

	rec := newRecorder()
	w := &workload{c: c, vol: vol, rec: rec, blocks: cfg.blocks, timeout: 10 * time.Second}
	w.run(cfg.clients, cfg.seed)
	st := &tortureStats{killsBy: map[string]int{}}
	began := time.Now()
	nemesisErr := runSchedule(t, c, vol, w, rng, cfg, st, began)
	// Restart whatever the last fault left down and keep the load on
	// until the volume is healthy again, so the last failover's outage
	// is measured too.
	for _, m := range c.masters {
		if !m.running() {
			m.start(t)
		}
	}
	for _, id := range c.ids() {
		if !c.server(id).running() {
			c.server(id).start(t)
		}
	}
	if waitUntil(60*time.Second, func() error { return c.healthy(vol) }) == nil {
		time.Sleep(2 * time.Second)
	}
	w.halt()

	// Heal: everything up, the volume healthy, then a final flush and a
	// read of every block through the primary.
	for _, id := range c.ids() {
		if !c.server(id).running() {
			c.server(id).start(t)
		}
	}
	for _, px := range c.proxies {
		px.setDelay(0)
	}
	for _, mp := range c.mproxy {
		mp.setCut(false)
	}
	if c.lab != nil {
		for _, id := range ids {
			_ = c.lab.setLink(id, true)
		}
	}
	healErr := waitUntil(120*time.Second, func() error { return c.healthy(vol) })
	final, finalErr := w.finalRead(cfg.clients)
	history := rec.history()

	for i := range st.failovers {
		measureOutage(&st.failovers[i], history)
	}
	for i := range st.leaderKills {
		measureLeaderKill(&st.leaderKills[i], history)
		if st.leaderKills[i].flushGap < 0 {
			t.Errorf("no durable write (flush) succeeded after master leader %s was killed and %s elected", st.leaderKills[i].killed, st.leaderKills[i].elected)
		}
	}
	checkStart := time.Now()
	res, err := Check(history, cfg.seed, ArtifactDir(), 3*time.Minute)
	if err != nil {
		t.Errorf("check: %v", err)
	}
	lost := LostFlushed(history, final)
	if mut, b, ok := mutateLoseFlushed(history, final); ok {
		mres, err := Check(mut, cfg.seed, t.TempDir(), 3*time.Minute)
		if err != nil || mres.Linearizable() || len(LostFlushed(mut, map[int64]uint64{b: 0})) == 0 {
			t.Errorf("the checker accepted this run's history with block %d's flushed write lost: %s, %v", b, mres.Verdict, err)
		} else {
			t.Logf("sensitivity: the same history with block %d's flushed write lost is refused (%s)", b, mres.Verdict)
		}
	} else {
		t.Errorf("no block holds a flushed write at the end: the run proved nothing")
	}
	report := summary(cfg, st, res, lost, history, time.Since(began), time.Since(checkStart), w.dials.Load())
	t.Log(report)
	if p := saveSummary(cfg.seed, report); p != "" {
		t.Logf("summary saved in %s", p)
	}
	if nemesisErr != nil {
		t.Errorf("schedule: %v", nemesisErr)
	}
	if healErr != nil {
		t.Errorf("volume not healthy after the run: %v", healErr)
	}
	if finalErr != nil {
		t.Errorf("final read: %v", finalErr)
	}
	if len(st.failovers) < cfg.failovers {
		t.Errorf("only %d failovers in the budget of %v (want %d)", len(st.failovers), cfg.budget, cfg.failovers)
	}
	if len(lost) > 0 {
		t.Errorf("acknowledged flushed writes lost in blocks %v (seed %d)", lost, cfg.seed)
	}
	switch {
	case res.Verdict == "Illegal":
		t.Errorf("history NOT linearizable at block %d (seed %d); minimal sub-history of %d ops, visualisation and history saved in %s",
			res.BadBlock, cfg.seed, res.BadOps, res.Artifacts)
	case res.Verdict != "Ok":
		// Keep the history: the checker can be rerun on it alone.
		p := filepath.Join(ArtifactDir(), fmt.Sprintf("history-seed-%d-unknown.json", cfg.seed))
		if err := os.MkdirAll(ArtifactDir(), 0o755); err == nil {
			if err := writeJSON(p, history); err != nil {
				p = "not saved: " + err.Error()
			}
		}
		t.Errorf("linearizability check inconclusive: %s (seed %d); history in %s", res.Verdict, cfg.seed, p)
	}
}

func pick(rng *rand.Rand, faults []fault, weights []int) fault {
	total := 0
	for _, w := range weights {
		total += w
	}
	n := rng.Intn(total)
	for i, w := range weights {
		if n < w {
			return faults[i]
		}
		n -= w
	}
	return faults[0]
}

func jitter(rng *rand.Rand, lo, hi time.Duration) time.Duration {
	return lo + time.Duration(rng.Int63n(int64(hi-lo)+1))
}

// runSchedule causes faults until enough failovers happened or the budget
// is spent. Every decision comes from rng, so a seed replays the schedule
// (the timing of the processes does not replay).
func runSchedule(t *testing.T, c *cluster, vol string, w *workload, rng *rand.Rand, cfg tortureConfig, st *tortureStats, began time.Time) error {
	rec := w.rec
	for len(st.failovers) < cfg.failovers && time.Since(began) < cfg.budget {
		if err := waitUntil(90*time.Second, func() error { return c.healthy(vol) }); err != nil {
			return fmt.Errorf("volume not healthy before fault %d: %w", st.kills+st.isolations+st.slowLinks, err)
		}
		time.Sleep(jitter(rng, 300*time.Millisecond, 1200*time.Millisecond))
		info, err := c.info(vol)
		if err != nil {
			return err
		}
		primary := info.Primary.ServerID
		var replicas []string
		for _, r := range info.Replicas {
			replicas = append(replicas, r.ServerID)
		}
		sort.Strings(replicas)
		f := pick(rng, cfg.faults, cfg.weights)
		switch f {
		case faultKillPrimary, faultReaddress, faultPromoteRace:
			fo := failover{fault: f, from: primary}
			fo.killAt = rec.now()
			c.server(primary).kill9()
			rec.add(Op{Client: cfg.clients + 1, Kind: KindCrash, Call: fo.killAt, Return: rec.now(), Outcome: OK,
				Note: fmt.Sprintf("%s %s", f, primary)})
			st.kills++
			st.killsBy["primary"]++
			if f == faultPromoteRace {
				// Race the master's own failover: promote the
				// replica the schedule chose around the lease expiry.
				time.Sleep(jitter(rng, cfg.leaseTTL-500*time.Millisecond, cfg.leaseTTL+500*time.Millisecond))
				target := replicas[rng.Intn(len(replicas))]
				// Half of them compare-and-swap on the epoch
				// the schedule saw; the others do not.
				req := api.PromoteRequest{Target: target}
				if rng.Intn(2) == 0 {
					req.Epoch = info.Epoch
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				_, perr := c.client.Promote(ctx, vol, req)
				cancel()
				st.promotes++
				st.notes = append(st.notes, fmt.Sprintf("promote %s (epoch %d) racing the failover: %v", target, req.Epoch, errString(perr)))
			}
			to, err := waitPromoted(c, vol, primary, info.Epoch, 60*time.Second)
			if err != nil {
				return fmt.Errorf("no failover after %s of %s: %w", f, primary, err)
			}
			fo.to, fo.promotedAt = to, rec.now()
			st.failovers = append(st.failovers, fo)
			time.Sleep(jitter(rng, 0, time.Second))
			if f == faultReaddress {
				c.readdress(primary)
				st.readdresses++
			}
			c.server(primary).start(t)
		case faultIsolatePrimry:
			// The primary loses its link to the master (its
			// replication links stay) while the clients keep writing
			// to it; its lease runs out and the master promotes a
			// replica. Heal after the failover. From the model's view
			// the cut is a crash until the new primary is named: the
			// old primary's unflushed writes may be lost.
			mp := c.mproxy[primary]
			if mp == nil {
				continue
			}
			fo := failover{fault: f, from: primary, killAt: rec.now()}
			mp.setCut(true)
			st.isolations++
			to, err := waitPromoted(c, vol, primary, info.Epoch, 60*time.Second)
			rec.add(Op{Client: cfg.clients + 1, Kind: KindCrash, Call: fo.killAt, Return: rec.now(), Outcome: OK,
				Note: fmt.Sprintf("%s %s", f, primary)})
			if err != nil {
				mp.setCut(false)
				return fmt.Errorf("no failover after isolating %s: %w", primary, err)
			}
			fo.to, fo.promotedAt = to, rec.now()
			st.failovers = append(st.failovers, fo)
			time.Sleep(jitter(rng, 0, 2*time.Second))
			mp.setCut(false)
		case faultPartition:
			if c.lab == nil {
				continue
			}
			fo := failover{fault: f, from: primary, killAt: rec.now()}
			if err := c.lab.setLink(primary, false); err != nil {
				return err
			}
			st.isolations++
			to, err := waitPromoted(c, vol, primary, info.Epoch, 60*time.Second)
			rec.add(Op{Client: cfg.clients + 1, Kind: KindCrash, Call: fo.killAt, Return: rec.now(), Outcome: OK,
				Note: fmt.Sprintf("%s %s", f, primary)})
			if err != nil {
				_ = c.lab.setLink(primary, true)
				return fmt.Errorf("no failover after partitioning %s: %w", primary, err)
			}
			fo.to, fo.promotedAt = to, rec.now()
			st.failovers = append(st.failovers, fo)
			time.Sleep(jitter(rng, 0, 2*time.Second))
			if err := c.lab.setLink(primary, true); err != nil {
				return err
			}
		case faultKillLeader:
			// The volume must go on serving durable writes: the
			// primary's lease is renewed by the new leader.
			lk, li, err := killLeader(t, c, rec, f)
			if err != nil {
				return err
			}
			st.kills++
			st.killsBy["leader"]++
			if err := lk.waitElected(c, rec, li); err != nil {
				return err
			}
			time.Sleep(jitter(rng, 0, 3*time.Second))
			if after, err := c.info(vol); err == nil && after.Epoch != info.Epoch {
				lk.epochMoved = true
			}
			st.leaderKills = append(st.leaderKills, lk)
			c.masters[li].start(t)
		case faultLeaderPrimary:
			// The primary dies while the leader is down: the next
			// leader (which never saw the primary's last lease) must
			// wait it out and fail over correctly. Or the primary dies
			// first and the leader is killed in the middle of the
			// failover (during the lease wait, or as it promotes).
			primaryFirst := rng.Intn(2) == 0
			fo := failover{fault: f, from: primary}
			killPrimary := func() {
				fo.killAt = rec.now()
				c.server(primary).kill9()
				rec.add(Op{Client: cfg.clients + 1, Kind: KindCrash, Call: fo.killAt, Return: rec.now(), Outcome: OK,
					Note: fmt.Sprintf("%s %s", f, primary)})
				st.kills++
				st.killsBy["primary"]++
			}
			if primaryFirst {
				killPrimary()
				time.Sleep(jitter(rng, 0, cfg.leaseTTL+time.Second))
			}
			lk, li, err := killLeader(t, c, rec, f)
			if err != nil {
				return err
			}
			st.kills++
			st.killsBy["leader"]++
			if primaryFirst {
				st.notes = append(st.notes, fmt.Sprintf("%s: primary %s killed first, leader %s %s later (mid-failover)",
					f, primary, lk.killed, time.Duration(lk.killAt-fo.killAt).Round(10*time.Millisecond)))
			} else {
				time.Sleep(jitter(rng, 0, 800*time.Millisecond))
				killPrimary()
			}
			if err := lk.waitElected(c, rec, li); err != nil {
				return err
			}
			restartEarly := rng.Intn(2) == 0 // the old leader back before or after the failover
			if restartEarly {
				c.masters[li].start(t)
			}
			to, err := waitPromoted(c, vol, primary, info.Epoch, 60*time.Second)
			if err != nil {
				return fmt.Errorf("no failover after %s (leader %s, primary %s): %w", f, lk.killed, primary, err)
			}
			fo.to, fo.promotedAt = to, rec.now()
			st.failovers = append(st.failovers, fo)
			st.leaderKills = append(st.leaderKills, lk)
			time.Sleep(jitter(rng, 0, time.Second))
			if !restartEarly {
				c.masters[li].start(t)
			}
			c.server(primary).start(t)
		case faultReconnect:
			d := jitter(rng, 2*time.Second, 5*time.Second)
			n := reconnectStorm(c, vol, w, rng, 3, d, cfg.clients+2)
			st.storms++
			st.stormConns += n
		case faultKillReplica:
			victim := replicas[rng.Intn(len(replicas))]
			c.server(victim).kill9()
			st.kills++
			st.killsBy["replica"]++
			time.Sleep(jitter(rng, 200*time.Millisecond, 2*time.Second))
			c.server(victim).start(t)
		case faultFullDisk, faultBadDisk:
			victim := replicas[rng.Intn(len(replicas))]
			p := c.server(victim)
			p.kill9()
			st.kills++
			st.killsBy["replica"]++
			st.fullDisks++
			spec := fmt.Sprintf("write+allocate+truncate:*:enospc,after=%d", rng.Intn(400))
			if f == faultBadDisk {
				spec = fmt.Sprintf("sync:*:eio,p=%.2f", 0.05+rng.Float64()*0.3)
				if rng.Intn(2) == 0 {
					spec = fmt.Sprintf("sync+syncdir:*:delay,latency=%dms", 20+rng.Intn(200))
				}
			}
			st.notes = append(st.notes, fmt.Sprintf("%s on %s: %s", f, victim, spec))
			p.env = []string{vfs.FaultsEnv + "=" + spec, vfs.FaultsSeedEnv + "=" + strconv.FormatInt(cfg.seed, 10)}
			p.start(t)
			p.env = nil
			time.Sleep(jitter(rng, time.Second, 4*time.Second))
			p.kill9()
			p.start(t)
		case faultSlowReplica:
			victim := replicas[rng.Intn(len(replicas))]
			px := c.proxies[victim]
			if px == nil {
				continue
			}
			d := jitter(rng, 5*time.Millisecond, 80*time.Millisecond)
			px.setDelay(d)
			st.slowLinks++
			time.Sleep(jitter(rng, time.Second, 4*time.Second))
			px.setDelay(0)
		}
	}
	return nil
}

func errString(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

// waitPromoted waits until the master names a primary other than old at a
// higher epoch.
func waitPromoted(c *cluster, vol, old string, epoch uint64, d time.Duration) (string, error) {
	var to string
	err := waitUntil(d, func() error {
		info, err := c.info(vol)
		if err != nil {
			return err
		}
		if info.Primary.ServerID == old || info.Epoch <= epoch || info.Primary.ServerID == "" {
			return fmt.Errorf("primary %s at epoch %d", info.Primary.ServerID, info.Epoch)
		}
		to = info.Primary.ServerID
		return nil
	})
	return to, err
}

// measureOutage: the longest time around a failover during which no
// write (flush) succeeded: the largest gap between successive successful
// completions from the fault until the first success invoked after the
// master named the new primary (an isolated primary may go on serving
// until its lease runs out, so the first success after the fault is not
// the end of the outage).
func measureOutage(fo *failover, h []Op) {
	fo.writeOutage = longestGap(h, KindWrite, fo.killAt, fo.promotedAt)
	fo.flushOutage = longestGap(h, KindFlush, fo.killAt, fo.promotedAt)
}

func longestGap(h []Op, kind Kind, from, promoted int64) time.Duration {
	var rets []int64
	end := int64(-1)
	for _, op := range h {
		if op.Kind != kind || op.Outcome != OK || op.Note == "final" || op.Return < from {
			continue
		}
		rets = append(rets, op.Return)
		if op.Call >= promoted && (end < 0 || op.Return < end) {
			end = op.Return
		}
	}
	if end < 0 {
		return -1
	}
	sort.Slice(rets, func(i, j int) bool { return rets[i] < rets[j] })
	gap, prev := int64(0), from
	for _, r := range rets {
		if r > end {
			break
		}
		if r-prev > gap {
			gap = r - prev
		}
		prev = r
	}
	return time.Duration(gap)
}

// mutateLoseFlushed returns a copy of h in which the final read of one
// block that holds a flushed write returns zeros instead: the checker must
// refuse it, or the run proved nothing.
func mutateLoseFlushed(h []Op, final map[int64]uint64) ([]Op, int64, bool) {
	blocks := make([]int64, 0, len(final))
	for b, tag := range final {
		if tag != 0 {
			blocks = append(blocks, b)
		}
	}
	sort.Slice(blocks, func(i, j int) bool { return blocks[i] < blocks[j] })
	for _, b := range blocks {
		m := map[int64]uint64{b: 0}
		if len(LostFlushed(h, m)) == 0 {
			continue // its value was never flushed
		}
		out := append([]Op(nil), h...)
		for i := len(out) - 1; i >= 0; i-- {
			if out[i].Kind == KindRead && out[i].Note == "final" && out[i].Block == b {
				out[i].Tags = []uint64{0}
				return out, b, true
			}
		}
	}
	return nil, 0, false
}
