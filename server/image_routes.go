package server

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/blockvol"
)

// registerImageRoutes adds the image routes under /v1/server/volumes/{name}/:
// GET export streams an image (image_export.go), POST import applies one
// (image_import.go). Both are served by the volume's primary only.
func (s *Server) registerImageRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /v1/server/volumes/{name}/export", s.handleExport)
	mux.HandleFunc("POST /v1/server/volumes/{name}/import", s.handleImport)
}

func imageError(code string, status int, format string, a ...any) *api.Error {
	return &api.Error{Code: code, Message: fmt.Sprintf(format, a...), Status: status}
}

// imageSnapError maps an engine snapshot error to the reply, naming the
// volume and the snapshot.
func imageSnapError(vol, snap string, err error) *api.Error {
	switch {
	case errors.Is(err, blockvol.ErrSnapshotNotFound):
		return api.Errorf(api.CodeNotFound, "volume %s has no snapshot %q", vol, snap)
	case errors.Is(err, blockvol.ErrSnapshotName):
		return api.Errorf(api.CodeBadRequest, "%v", err)
	case errors.Is(err, blockvol.ErrSnapshotExists):
		return api.Errorf(api.CodeAlreadyExists, "volume %s: %v", vol, err)
	case errors.Is(err, blockvol.ErrSnapshotBusy):
		return api.Errorf(api.CodeBusy, "volume %s: %v", vol, err)
	case errors.Is(err, blockdev.ErrNotPrimary):
		return api.Errorf(api.CodeNotPrimary, "volume %s: %v", vol, err)
	case errors.Is(err, blockdev.ErrNoSpace):
		return imageError(api.CodeNoSpace, http.StatusInsufficientStorage, "volume %s: %v", vol, err)
	}
	return api.Errorf(api.CodeInternal, "volume %s: snapshot %q: %v", vol, snap, err)
}

// tempSnapName is a snapshot name no other export or import uses: the
// earlier system's fixed temporary snapshot ID let concurrent exports
// delete each other's snapshot.
func tempSnapName(prefix string) string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}
