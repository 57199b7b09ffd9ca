package server

import (
	"context"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
)

// heartbeatLoop reports to the master and applies its replies until Close.
// A failed heartbeat grants nothing: leases simply run out.
func (s *Server) heartbeatLoop() {
	failures := 0
	for {
		sent := time.Now()
		ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
		resp, err := s.client.Heartbeat(ctx, s.report())
		cancel()
		if s.ctx.Err() != nil {
			return
		}
		if err != nil {
			failures++
			if failures == 1 || failures%20 == 0 {
				s.log.Warn("heartbeat_failed", "err", err, "failures", failures)
			}
		} else {
			if failures > 0 {
				s.log.Info("heartbeat_restored", "after_failures", failures)
			}
			failures = 0
			s.apply(resp, sent)
			s.mu.Lock()
			s.lastHB = time.Now()
			if resp.HeartbeatIntervalMS > 0 {
				s.hbInterval = time.Duration(resp.HeartbeatIntervalMS) * time.Millisecond
			}
			s.mu.Unlock()
		}
		s.mu.Lock()
		wait := s.hbInterval
		s.mu.Unlock()
		select {
		case <-s.ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// report is the heartbeat: this server and every volume it hosts.
func (s *Server) report() api.HeartbeatRequest {
	total, free := s.capacity()
	req := api.HeartbeatRequest{ServerID: s.cfg.ServerID, Addr: s.Addr(), NBDAddr: s.NBDAddr(), HTTPAddr: s.HTTPAddr(),
		CapacityBytes: total, FreeBytes: free, Failures: s.fails.list()}
	for _, st := range s.host.Status() {
		s.mu.Lock()
		h := s.vols[st.Volume]
		s.mu.Unlock()
		if h == nil {
			continue // being dropped
		}
		h.mu.Lock()
		id := h.id
		h.mu.Unlock()
		hv := api.HeartbeatVolume{Name: st.Volume, ID: id, Role: string(st.Role), Epoch: st.Epoch,
			HeadLSN: st.HeadLSN, CheckpointLSN: st.CheckpointLSN, DurableLSN: st.DurableLSN}
		h.reportExpand(&hv) // expand.go
		for _, r := range st.Replicas {
			hv.Replicas = append(hv.Replicas, api.HeartbeatReplica{ServerID: r.ServerID,
				State: apiState(r.State), FlushedLSN: r.FlushedLSN, Progress: apiProgress(r.Progress)})
		}
		req.Volumes = append(req.Volumes, hv)
	}
	return req
}

// Serving reports whether the volume is primary here with a live lease:
// what `blockd serve` waits for before it prints the URI.
func (s *Server) Serving(volume string) bool {
	if _, ok := s.host.Device(volume); !ok {
		return false
	}
	for _, st := range s.host.Status() {
		if st.Volume == volume {
			return time.Now().Before(st.LeaseUntil)
		}
	}
	return false
}

// apiState names a replica state as the master's API does (api.State*).
func apiState(st replication.ReplicaState) string {
	switch st {
	case replication.Disconnected:
		return api.StateDisconnected
	case replication.Connecting:
		return api.StateConnecting
	case replication.CatchingUp:
		return api.StateCatchingUp
	case replication.InSync:
		return api.StateInSync
	case replication.Degraded:
		return api.StateDegraded
	case replication.NeedsRebuild:
		return api.StateNeedsRebuild
	case replication.Rebuilding:
		return api.StateRebuilding
	}
	return st.String()
}
