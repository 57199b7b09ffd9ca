package master

import "github.com/blockd/blockd/api"

// Per-volume NBD allow lists: raft state (VolumeRecord.Allow), set at
// create (CreateVolumeRequest.Allow) and by update (opSetAllow, no epoch
// change: it is not an authority change), sent to the servers in every
// assignment, checked by the primary at NBD_OPT_GO against the client
// certificate's name.

// opSetAllow replaces a volume's allow list (compare on its ID).
const opSetAllow = "set_allow"

// applySetAllow is the opSetAllow case of fsmState.apply.
func (s *fsmState) applySetAllow(c *command) *applyResult {
	v, ok := s.Volumes[c.Name]
	if !ok {
		return &applyResult{Err: api.Errorf(api.CodeNotFound, "volume %q not found", c.Name)}
	}
	if c.ID != 0 && v.ID != c.ID {
		return &applyResult{Err: api.Errorf(api.CodeEpochChanged, "volume %q is incarnation %d, expected %d", c.Name, v.ID, c.ID)}
	}
	if err := api.ValidateAllow(c.Allow); err != nil {
		return &applyResult{Err: api.Errorf(api.CodeBadRequest, "%v", err)}
	}
	v.Allow = cloneAllow(c.Allow)
	return &applyResult{Vol: v.clone()}
}

func cloneAllow(a []api.AllowEntry) []api.AllowEntry {
	if len(a) == 0 {
		return nil
	}
	return append([]api.AllowEntry(nil), a...)
}

// updateAllow applies UpdateVolumeRequest.Allow.
func (m *Master) updateAllow(v *VolumeRecord, req api.UpdateVolumeRequest) (*VolumeRecord, *api.Error) {
	if req.Allow == nil {
		return v, nil
	}
	if err := api.ValidateAllow(*req.Allow); err != nil {
		return nil, api.Errorf(api.CodeBadRequest, "%v", err)
	}
	res := m.apply(command{Op: opSetAllow, Name: v.Name, ID: v.ID, Allow: *req.Allow})
	if res.Err != nil {
		return nil, res.Err
	}
	m.log.Info("volume_allow_updated", "volume", v.Name, "allow", api.FormatAllow(res.Vol.Allow), "old_allow", api.FormatAllow(v.Allow))
	return res.Vol, nil
}
