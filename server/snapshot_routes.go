package server

import (
	"errors"
	"net/http"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/tlsauth"
)

// Snapshot routes of the admin API (api/snapshot.go). Only the volume's
// primary, with a live lease, serves them (primaryFor); the operations go
// through replication.Primary, which checks authority again, calls the
// engine and flushes so that each returns once durable per the volume's
// durability mode.

func (s *Server) registerSnapshotRoutes(mux *http.ServeMux) {
	mux.HandleFunc("POST /v1/server/volumes/{name}/snapshots", s.hSnapCreate)
	mux.HandleFunc("GET /v1/server/volumes/{name}/snapshots", s.hSnapList)
	mux.HandleFunc("DELETE /v1/server/volumes/{name}/snapshots/{snap}", s.hSnapDelete)
	mux.HandleFunc("POST /v1/server/volumes/{name}/snapshots/{snap}/restore", s.hSnapRestore)
}

// snapInfo is the API's view of an engine snapshot.
func snapInfo(volume string, epoch uint64, i blockvol.SnapshotInfo) api.SnapshotInfo {
	return api.SnapshotInfo{Name: i.Name, Created: i.Created, LSN: i.LSN, SizeBytes: i.SizeBytes, ID: i.ID,
		UUID: i.UUID, HeldBytes: i.HeldBytes, Volume: volume, Epoch: epoch}
}

// snapError maps an engine or replication error to the API's.
func snapError(err error) *api.Error {
	code := api.CodeInternal
	switch {
	case errors.Is(err, blockvol.ErrSnapshotName):
		code = api.CodeBadRequest
	case errors.Is(err, blockvol.ErrSnapshotNotFound):
		code = api.CodeNotFound
	case errors.Is(err, blockvol.ErrSnapshotExists):
		code = api.CodeAlreadyExists
	case errors.Is(err, blockvol.ErrSnapshotBusy):
		code = api.CodeBusy
	case errors.Is(err, blockdev.ErrNotPrimary):
		code = api.CodeNotPrimary
	case errors.Is(err, blockdev.ErrNoSpace):
		code = api.CodeBadSize
	}
	return api.Errorf(code, "%v", err)
}

// caller names who made the request, for the log.
func caller(r *http.Request) string {
	if r.TLS != nil {
		if id, err := tlsauth.PeerIdentity(*r.TLS); err == nil {
			return id.String()
		}
	}
	return ""
}

// refuseSnap answers e and logs the refusal.
func (s *Server) refuseSnap(w http.ResponseWriter, r *http.Request, op, volume, snap string, e *api.Error) {
	s.log.Warn("snapshot_request_refused", "op", op, "volume", volume, "snapshot", snap, "code", e.Code,
		"reason", e.Message, "remote", r.RemoteAddr, "identity", caller(r))
	writeError(w, e)
}

func (s *Server) hSnapCreate(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	var req api.CreateSnapshotRequest
	if e := decodeBody(r, &req); e != nil {
		s.refuseSnap(w, r, "create", name, "", e)
		return
	}
	if err := blockvol.CheckSnapshotName(req.Name); err != nil {
		s.refuseSnap(w, r, "create", name, req.Name, snapError(err))
		return
	}
	_, p, e := s.primaryFor(name)
	if e != nil {
		s.refuseSnap(w, r, "create", name, req.Name, e)
		return
	}
	info, err := p.CreateSnapshot(req.Name, blockvol.SnapshotOptions{})
	if err != nil {
		s.refuseSnap(w, r, "create", name, req.Name, snapError(err))
		return
	}
	s.log.Info("snapshot_api_created", "volume", name, "snapshot", info.Name, "id", info.ID, "lsn", info.LSN,
		"epoch", p.Epoch(), "remote", r.RemoteAddr, "identity", caller(r))
	writeJSON(w, http.StatusCreated, snapInfo(name, p.Epoch(), info))
}

func (s *Server) hSnapList(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	_, p, e := s.primaryFor(name)
	if e != nil {
		s.refuseSnap(w, r, "list", name, "", e)
		return
	}
	list, err := p.Snapshots()
	if err != nil {
		s.refuseSnap(w, r, "list", name, "", snapError(err))
		return
	}
	out := make([]api.SnapshotInfo, 0, len(list))
	for _, i := range list {
		out = append(out, snapInfo(name, p.Epoch(), i))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) hSnapDelete(w http.ResponseWriter, r *http.Request) {
	name, snap := r.PathValue("name"), r.PathValue("snap")
	if err := blockvol.CheckSnapshotName(snap); err != nil {
		s.refuseSnap(w, r, "delete", name, snap, snapError(err))
		return
	}
	_, p, e := s.primaryFor(name)
	if e != nil {
		s.refuseSnap(w, r, "delete", name, snap, e)
		return
	}
	if err := p.DeleteSnapshot(snap); err != nil {
		s.refuseSnap(w, r, "delete", name, snap, snapError(err))
		return
	}
	s.log.Info("snapshot_api_deleted", "volume", name, "snapshot", snap, "epoch", p.Epoch(), "remote", r.RemoteAddr, "identity", caller(r))
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) hSnapRestore(w http.ResponseWriter, r *http.Request) {
	name, snap := r.PathValue("name"), r.PathValue("snap")
	if err := blockvol.CheckSnapshotName(snap); err != nil {
		s.refuseSnap(w, r, "restore", name, snap, snapError(err))
		return
	}
	_, p, e := s.primaryFor(name)
	if e != nil {
		s.refuseSnap(w, r, "restore", name, snap, e)
		return
	}
	info, err := p.RestoreSnapshot(snap)
	if err != nil {
		s.refuseSnap(w, r, "restore", name, snap, snapError(err))
		return
	}
	// The volume's content changed under its clients: cut the NBD clients
	// of the live export off so that they reconnect (a client's caches
	// still hold what it read before the restore).
	n := s.nbdSrv.DisconnectExport(name)
	s.log.Info("snapshot_api_restored", "volume", name, "snapshot", snap, "lsn", info.LSN, "epoch", p.Epoch(),
		"nbd_conns_closed", n, "remote", r.RemoteAddr, "identity", caller(r))
	writeJSON(w, http.StatusOK, snapInfo(name, p.Epoch(), info))
}
