package main

// blockd status: the cluster at a glance (masters and the leader, servers,
// volumes), from the masters' API.

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
)

func init() {
	register(&cli.Command{
		Name:  "status",
		Usage: "the cluster at a glance: masters and the leader, servers, volumes and their health",
		Description: "Asks every master given (and every peer the leader names) for its raft state, then the\n" +
			"leader for servers and volumes.\n\n" +
			"Example:\n" +
			"  blockd status --master 127.0.0.1:9331,127.0.0.1:9332,127.0.0.1:9333\n" +
			"  blockd status -o json | jq '.volumes[] | select(.status != \"healthy\")'",
		Flags:  volClientFlags(),
		Action: clientCmd("", statusCmd),
	})
}

// StatusMaster is one master in `blockd status -o json`.
type StatusMaster struct {
	Addr      string `json:"addr"`
	Reachable bool   `json:"reachable"`
	Error     string `json:"error,omitempty"`
	State     string `json:"state,omitempty"`
	IsLeader  bool   `json:"is_leader"`
	Term      uint64 `json:"term,omitempty"`
	Applied   uint64 `json:"applied_index,omitempty"`
}

// StatusReplica is a replica that is not InSync (or is stale).
type StatusReplica struct {
	ServerID string                `json:"server_id"`
	State    string                `json:"state"`
	Stale    bool                  `json:"stale"`
	Progress *api.TransferProgress `json:"progress,omitempty"`
}

// StatusVolume is one volume in `blockd status -o json`.
type StatusVolume struct {
	Name      string          `json:"name"`
	Status    string          `json:"status"`
	SizeBytes int64           `json:"size_bytes"`
	Primary   string          `json:"primary"`
	Epoch     uint64          `json:"epoch"`
	RF        int             `json:"rf"`
	FlushesOK bool            `json:"flushes_ok"`
	Blocker   string          `json:"flush_blocker,omitempty"`
	Degraded  []StatusReplica `json:"degraded_replicas"`
}

// StatusReport is `blockd status -o json`.
type StatusReport struct {
	Leader  string           `json:"leader"`
	Masters []StatusMaster   `json:"masters"`
	Servers []api.ServerInfo `json:"servers"`
	Volumes []StatusVolume   `json:"volumes"`
}

func statusCmd(v *volCtx) error {
	if len(v.args) > 0 {
		return fmt.Errorf("unexpected arguments %s (status takes none)", api.QuoteName(strings.Join(v.args, " ")))
	}
	rep, err := gatherStatus(v.ctx, v.cl, v.c.Duration("timeout"))
	if err != nil {
		return err
	}
	if v.json {
		return v.emitJSON(rep)
	}
	printStatus(v, rep)
	return nil
}

func gatherStatus(ctx context.Context, cl *api.Client, timeout time.Duration) (*StatusReport, error) {
	rep := &StatusReport{Masters: []StatusMaster{}, Servers: []api.ServerInfo{}, Volumes: []StatusVolume{}}
	seen := map[string]bool{}
	queue := cl.Addrs()
	for len(queue) > 0 {
		addr := queue[0]
		queue = queue[1:]
		key := strings.TrimPrefix(strings.TrimPrefix(addr, "http://"), "https://")
		if seen[key] {
			continue
		}
		seen[key] = true
		sm := StatusMaster{Addr: key}
		cctx, cancel := context.WithTimeout(ctx, timeout)
		st, err := cl.Status(cctx, addr)
		cancel()
		if err != nil {
			sm.Error = shortReason(err)
		} else {
			sm.Reachable, sm.State, sm.IsLeader, sm.Term, sm.Applied = true, st.State, st.IsLeader, st.Term, st.Applied
			if st.Leader != "" && rep.Leader == "" {
				rep.Leader = st.Leader
			}
			if st.IsLeader {
				rep.Leader = st.ID
			}
			queue = append(queue, st.Peers...)
		}
		rep.Masters = append(rep.Masters, sm)
	}
	reachable := false
	for _, m := range rep.Masters {
		reachable = reachable || m.Reachable
	}
	if !reachable {
		var why []string
		for _, m := range rep.Masters {
			why = append(why, m.Addr+" "+m.Error)
		}
		return rep, fmt.Errorf("no master answered: %s; give --master ADDR[,ADDR...] of a running master", strings.Join(why, ", "))
	}
	srvs, err := cl.Servers(ctx)
	if err != nil {
		return rep, fmt.Errorf("servers: %w", err)
	}
	sort.Slice(srvs, func(i, j int) bool { return srvs[i].ServerID < srvs[j].ServerID })
	rep.Servers = append(rep.Servers, srvs...)
	vols, err := cl.ListVolumes(ctx)
	if err != nil {
		return rep, fmt.Errorf("volumes: %w", err)
	}
	sort.Slice(vols, func(i, j int) bool { return vols[i].Name < vols[j].Name })
	for _, vi := range vols {
		sv := StatusVolume{Name: vi.Name, Status: vi.Status, SizeBytes: vi.SizeBytes, Primary: vi.Primary.ServerID,
			Epoch: vi.Epoch, RF: vi.RF, FlushesOK: vi.FlushesOK, Blocker: vi.FlushBlocker, Degraded: []StatusReplica{}}
		for _, r := range vi.Replicas {
			if r.State != api.StateInSync || r.Stale {
				sv.Degraded = append(sv.Degraded, StatusReplica{ServerID: r.ServerID, State: r.State, Stale: r.Stale, Progress: r.Progress})
			}
		}
		rep.Volumes = append(rep.Volumes, sv)
	}
	return rep, nil
}

func printStatus(v *volCtx, rep *StatusReport) {
	w := tabwriter.NewWriter(v.out, 0, 4, 2, ' ', 0)
	leader := rep.Leader
	if leader == "" {
		leader = "none known"
	}
	fmt.Fprintf(w, "MASTERS (leader %s)\n", leader)
	for _, m := range rep.Masters {
		if !m.Reachable {
			fmt.Fprintf(w, "  %s\tunreachable\t%s\n", m.Addr, m.Error)
			continue
		}
		role := strings.ToLower(m.State)
		if m.IsLeader {
			role = "leader"
		}
		fmt.Fprintf(w, "  %s\t%s\tterm %d\tapplied %d\n", m.Addr, role, m.Term, m.Applied)
	}
	w.Flush()
	alive := 0
	for _, s := range rep.Servers {
		if s.Alive {
			alive++
		}
	}
	fmt.Fprintf(v.out, "\nSERVERS (%d, %d alive)\n", len(rep.Servers), alive)
	w = tabwriter.NewWriter(v.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "  ID\tALIVE\tCAPACITY\tFREE\tVOLUMES\tLAST HEARTBEAT\tNBD\n")
	for _, s := range rep.Servers {
		hb := "never"
		if s.LastHeartbeatMS >= 0 {
			hb = (time.Duration(s.LastHeartbeatMS) * time.Millisecond).Round(100*time.Millisecond).String() + " ago"
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\t%s\t%d\t%s\t%s\n", s.ServerID, yesNo(s.Alive), volHumanSize(s.CapacityBytes),
			volHumanSize(s.FreeBytes), s.Volumes, hb, s.NBDAddr)
	}
	w.Flush()
	byStatus := map[string]int{}
	for _, vol := range rep.Volumes {
		byStatus[vol.Status]++
	}
	var parts []string
	for _, st := range []string{api.StatusHealthy, api.StatusDegraded, api.StatusPending, api.StatusFailingOver, api.StatusUnavailable, api.StatusFailed} {
		if byStatus[st] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", byStatus[st], st))
		}
	}
	fmt.Fprintf(v.out, "\nVOLUMES (%d", len(rep.Volumes))
	if len(parts) > 0 {
		fmt.Fprintf(v.out, ": %s", strings.Join(parts, ", "))
	}
	fmt.Fprintln(v.out, ")")
	w = tabwriter.NewWriter(v.out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "  NAME\tSTATUS\tSIZE\tRF\tPRIMARY\tEPOCH\tDEGRADED REPLICAS\n")
	for _, vol := range rep.Volumes {
		var deg []string
		for _, r := range vol.Degraded {
			d := r.ServerID + " " + r.State
			if r.Stale {
				d += " (stale)"
			}
			if p := r.Progress; p != nil && p.TotalBytes > 0 {
				d += fmt.Sprintf(" %s %d%%", p.Kind, p.DoneBytes*100/p.TotalBytes)
			}
			deg = append(deg, d)
		}
		ds := "-"
		if len(deg) > 0 {
			ds = strings.Join(deg, ", ")
		}
		primary := vol.Primary
		if primary == "" {
			primary = "-"
		}
		fmt.Fprintf(w, "  %s\t%s\t%s\t%d\t%s\t%d\t%s\n", vol.Name, vol.Status, volHumanSize(vol.SizeBytes), vol.RF, primary, vol.Epoch, ds)
	}
	w.Flush()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// shortReason is why one master did not answer, in a few words.
func shortReason(err error) string {
	msg := oneLine(err)
	switch {
	case strings.Contains(msg, "connection refused"):
		return "refused the connection"
	case strings.Contains(msg, "i/o timeout"), strings.Contains(msg, "deadline exceeded"), strings.Contains(msg, "Client.Timeout"):
		return "did not answer within --timeout"
	case strings.Contains(msg, "no such host"):
		return "is an unknown host"
	case strings.Contains(msg, "certificate"), strings.Contains(msg, "tls:"):
		return "refused the TLS handshake: " + msg[strings.LastIndex(msg, ": ")+2:]
	}
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		return msg[i+2:]
	}
	return msg
}
