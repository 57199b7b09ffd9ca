package torture

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// The run's summary: what the schedule did, what the checker found, and
// the outage around each failover and master leader kill.

func summary(cfg tortureConfig, st *tortureStats, res Result, lost []int64, h []Op, ran, checked time.Duration, dials int64) string {
	var b strings.Builder
	counts := map[string]int{}
	for _, op := range h {
		counts[op.Kind.String()+"/"+op.Outcome.String()]++
	}
	var keys []string
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var cs []string
	for _, k := range keys {
		cs = append(cs, fmt.Sprintf("%s=%d", k, counts[k]))
	}
	lin := "yes"
	if !res.Linearizable() {
		lin = fmt.Sprintf("NO (%s, block %d, artifacts %s)", res.Verdict, res.BadBlock, res.Artifacts)
	}
	var maxW, maxF time.Duration
	var ws []string
	for _, fo := range st.failovers {
		if fo.writeOutage > maxW {
			maxW = fo.writeOutage
		}
		if fo.flushOutage > maxF {
			maxF = fo.flushOutage
		}
		ws = append(ws, fmt.Sprintf("%s %s->%s write %s flush %s", fo.fault, fo.from, fo.to, dur(fo.writeOutage), dur(fo.flushOutage)))
	}
	fmt.Fprintf(&b, "TORTURE SUMMARY seed=%d (TORTURE_SEED=%d replays the schedule)\n", cfg.seed, cfg.seed)
	fmt.Fprintf(&b, "  volume RF=%d %s; ran %v, checked in %v; faults: %v\n", cfg.rf, cfg.durability, ran.Round(time.Second), checked.Round(time.Millisecond), cfg.faults)
	fmt.Fprintf(&b, "  masters %d; failovers %d, kills %d (primary %d, replica %d, master leader %d), isolations %d, slow links %d, readdresses %d, racing promotes %d, full/bad disks %d, client dials %d\n",
		cfg.masters, len(st.failovers), st.kills, st.killsBy["primary"], st.killsBy["replica"], st.killsBy["leader"], st.isolations, st.slowLinks, st.readdresses, st.promotes, st.fullDisks, dials)
	byFault := map[fault]int{}
	for _, fo := range st.failovers {
		byFault[fo.fault]++
	}
	var bf []string
	for _, f := range cfg.faults {
		if n := byFault[f]; n > 0 {
			bf = append(bf, fmt.Sprintf("%s %d", f, n))
			byFault[f] = 0
		}
	}
	fmt.Fprintf(&b, "  failovers by fault: %s (partitions, the primary's only link down: %d; isolations from the masters only: %d)\n",
		strings.Join(bf, ", "), countFailovers(st.failovers, faultPartition), countFailovers(st.failovers, faultIsolatePrimry))
	fmt.Fprintf(&b, "  reconnect storms %d: %d NBD connections opened and closed by the storm clients\n", st.storms, st.stormConns)
	var maxLF, maxLW time.Duration
	moved := 0
	for _, lk := range st.leaderKills {
		maxLF, maxLW = max(maxLF, lk.flushGap), max(maxLW, lk.writeGap)
		if lk.epochMoved {
			moved++
		}
	}
	fmt.Fprintf(&b, "  master leader kills %d (%d of them kill_leader alone, %d changed the primary); longest durable-write (flush) outage around one: %s, longest write outage: %s\n",
		len(st.leaderKills), countFault(st.leaderKills, faultKillLeader), moved, dur(maxLF), dur(maxLW))
	for i, lk := range st.leaderKills {
		fmt.Fprintf(&b, "    leader kill %d: %s %s -> %s elected after %s; flush outage %s, write outage %s\n", i+1, lk.fault, lk.killed, lk.elected,
			time.Duration(lk.electedAt-lk.killAt).Round(10*time.Millisecond), dur(lk.flushGap), dur(lk.writeGap))
	}
	fmt.Fprintf(&b, "  client operations %d (%s); per-block operations checked %d over %d blocks\n",
		res.ClientOps, strings.Join(cs, " "), res.Ops, res.Blocks)
	fmt.Fprintf(&b, "  acknowledged flushed writes lost: %d %v\n", len(lost), lost)
	fmt.Fprintf(&b, "  linearizable: %s\n", lin)
	fmt.Fprintf(&b, "  longest write unavailability after a failover fault: %s; longest flush unavailability: %s\n", dur(maxW), dur(maxF))
	for i, s := range ws {
		fmt.Fprintf(&b, "    failover %d: %s\n", i+1, s)
	}
	for _, n := range st.notes {
		fmt.Fprintf(&b, "  note: %s\n", n)
	}
	return b.String()
}

func countFailovers(fos []failover, f fault) int {
	n := 0
	for _, fo := range fos {
		if fo.fault == f {
			n++
		}
	}
	return n
}

func countFault(lks []leaderKill, f fault) int {
	n := 0
	for _, lk := range lks {
		if lk.fault == f {
			n++
		}
	}
	return n
}

func dur(d time.Duration) string {
	if d < 0 {
		return "never"
	}
	return d.Round(10 * time.Millisecond).String()
}

func saveSummary(seed int64, report string) string {
	dir := ArtifactDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return ""
	}
	p := filepath.Join(dir, fmt.Sprintf("summary-seed-%d.txt", seed))
	if os.WriteFile(p, []byte(report), 0o644) != nil {
		return ""
	}
	return p
}
