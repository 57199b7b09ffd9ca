package server

import (
	"fmt"
	"sort"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/nbd"
)

// exports is the NBD frontend's view of the server: the volumes it is
// primary of. Any other name gets an error that names the primary.
type exports struct{ s *Server }

func (e exports) Lookup(name string) (nbd.Export, error) {
	e.s.mu.Lock()
	h := e.s.vols[name]
	e.s.mu.Unlock()
	if h == nil {
		return nbd.Export{}, fmt.Errorf("volume %q is not hosted on this server (%s)", name, e.s.cfg.ServerID)
	}
	dev, err := h.device()
	if err != nil {
		return nbd.Export{}, err
	}
	return nbd.Export{Name: name, Device: dev,
		Description: fmt.Sprintf("blockd volume %s (epoch %d, server %s)", name, h.vol.Epoch(), e.s.cfg.ServerID)}, nil
}

func (e exports) Names() []string {
	e.s.mu.Lock()
	defer e.s.mu.Unlock()
	var names []string
	for name, h := range e.s.vols {
		h.mu.Lock()
		if h.role == api.RolePrimary {
			names = append(names, name)
		}
		h.mu.Unlock()
	}
	sort.Strings(names)
	return names
}
