package server

import (
	"encoding/json"
	"net/http"

	"github.com/blockd/blockd/api"
)

// HTTPHandler is the server's admin API: every route lives under
// /v1/server/ so that `blockd serve` can mount it beside the master's
// routes on one listener. Errors are one-line JSON api.Error bodies.
func (s *Server) HTTPHandler() http.Handler {
	mux := http.NewServeMux()
	s.registerSnapshotRoutes(mux)
	s.registerImageRoutes(mux)
	return mux
}

// registerSnapshotRoutes adds the snapshot routes (snapshot_routes.go).
func (s *Server) registerSnapshotRoutes(mux *http.ServeMux) {}

// writeJSON answers with v as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeError answers with e as a one-line JSON error body.
func writeError(w http.ResponseWriter, e *api.Error) {
	st := e.Status
	if st == 0 {
		st = api.StatusFor(e.Code)
	}
	writeJSON(w, st, e)
}
