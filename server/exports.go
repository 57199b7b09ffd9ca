package server

import (
	"fmt"
	"sort"

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
	return nbd.Export{Name: name, Device: e.s.meter(name, dev), Access: h.access,
		Description: fmt.Sprintf("blockd volume %s (epoch %d, server %s)", name, h.vol.Epoch(), e.s.cfg.ServerID)}, nil
}

func (e exports) Names() []string {
	e.s.mu.Lock()
	all := make([]string, 0, len(e.s.vols))
	for name := range e.s.vols {
		all = append(all, name)
	}
	e.s.mu.Unlock()
	var names []string
	for _, name := range all {
		if _, ok := e.s.host.Device(name); ok {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names
}
