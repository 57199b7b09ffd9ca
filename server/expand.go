package server

import (
	"fmt"

	"github.com/blockd/blockd/api"
)

// expandState is what a hosted volume remembers of a failed prepare: it
// is reported (HeartbeatVolume.ExpandError) until the master ends that
// expand, and the prepare is not retried meanwhile.
type expandState struct {
	failedID uint64
	err      string
}

// applyExpand carries out the size part of an assignment, in this order:
//  1. SizeBytes above the volume's size: the master committed an expand.
//     A prepared size equal to it is committed; a member that never
//     prepared (it rejoined later) grows in one step. The primary's NBD
//     clients are cut off so that they renegotiate the new size.
//  2. An expand preparing (ExpandID): grow the extent and record the
//     pending size (blockvol.PrepareExpand); a failure is reported in the
//     heartbeat, where the master sees it and cancels.
//  3. No expand preparing: a pending size left over (the master cancelled,
//     or this server restarted across the decision) is dropped.
func (s *Server) applyExpand(h *hosted, a api.VolumeAssignment) error {
	vol := h.vol
	cur := vol.Size()
	pend, pid := vol.PendingExpand()
	if a.SizeBytes > cur {
		prepared := pend == a.SizeBytes
		var err error
		if prepared {
			err = vol.CommitExpand(a.SizeBytes)
		} else {
			err = vol.Expand(a.SizeBytes)
		}
		if err != nil {
			return fmt.Errorf("expand: %w", err)
		}
		// NBD fixes an export's size for the life of a connection: cut
		// the clients off so they renegotiate the new size (a kernel
		// keeper reconnects by itself and grows its device).
		n := s.nbdSrv.DisconnectExport(a.Volume)
		s.log.Info("volume_expanded", "volume", a.Volume, "from", cur, "size", a.SizeBytes, "prepared", prepared, "nbd_conns_closed", n)
		pend, pid = vol.PendingExpand()
	}
	switch {
	case a.ExpandID != 0 && a.ExpandSizeBytes > vol.Size():
		h.mu.Lock()
		failed := h.expand.failedID == a.ExpandID
		h.mu.Unlock()
		if failed || (pend == a.ExpandSizeBytes && pid == a.ExpandID) {
			return nil
		}
		if err := vol.PrepareExpand(a.ExpandSizeBytes, a.ExpandID); err != nil {
			h.mu.Lock()
			h.expand = expandState{failedID: a.ExpandID, err: err.Error()}
			h.mu.Unlock()
			s.log.Error("expand_prepare_failed", "volume", a.Volume, "expand_id", a.ExpandID, "size", a.ExpandSizeBytes, "err", err)
			return nil
		}
		s.log.Info("expand_prepared_local", "volume", a.Volume, "expand_id", a.ExpandID, "size", vol.Size(), "pending_size", a.ExpandSizeBytes)
	case a.ExpandID == 0 && pend != 0:
		if err := vol.CancelExpand(); err != nil {
			return fmt.Errorf("cancel expand %d: %w", pid, err)
		}
		s.log.Info("expand_cancelled_local", "volume", a.Volume, "expand_id", pid, "size", vol.Size(), "dropped_size", pend)
	}
	if a.ExpandID == 0 {
		h.mu.Lock()
		h.expand = expandState{}
		h.mu.Unlock()
	}
	return nil
}

// reportExpand fills the size fields of a heartbeat report.
func (h *hosted) reportExpand(hv *api.HeartbeatVolume) {
	hv.SizeBytes = h.vol.Size()
	hv.PendingSizeBytes, hv.ExpandID = h.vol.PendingExpand()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.expand.failedID != 0 && hv.ExpandID != h.expand.failedID {
		hv.ExpandID, hv.ExpandError = h.expand.failedID, h.expand.err
	}
}
