package server

import (
	"crypto/x509"
	"fmt"
	"strings"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
)

// Per-volume NBD access: the master's allow list arrives with every
// assignment (api.VolumeAssignment.Allow) and is checked at NBD_OPT_GO
// against the client certificate's name, so a client removed from the
// list is refused at its next connect or reconnect.

// setAllow records the allow list of the latest assignment.
func (h *hosted) setAllow(allow []api.AllowEntry) {
	h.mu.Lock()
	h.allow = append([]api.AllowEntry(nil), allow...)
	h.mu.Unlock()
}

// access is the nbd.Export.Access of the volume.
func (h *hosted) access(client string) (readOnly bool, err error) {
	h.mu.Lock()
	allow := h.allow
	h.mu.Unlock()
	if len(allow) == 0 {
		return false, nil
	}
	if client == "" {
		return false, fmt.Errorf("volume %s has an allow list: connect over TLS with a client certificate", h.name)
	}
	for _, a := range allow {
		if a.Client == client {
			return a.ReadOnly, nil
		}
	}
	return false, fmt.Errorf("client %s is not on the allow list of volume %s", api.QuoteName(client), h.name)
}

// peerName is the name a client certificate is known by in allow lists:
// a client's name, or KIND/NAME for a master's or a server's.
func peerName(cert *x509.Certificate) string {
	id, err := tlsauth.IdentityOf(cert)
	if err != nil {
		return ""
	}
	if id.Kind == tlsauth.KindClient {
		return id.Name
	}
	return string(id.Kind) + "/" + strings.TrimSpace(id.Name)
}
