package server

import "net/http"

// registerImageRoutes adds the image routes (export, import) under
// /v1/server/volumes/{name}/.
func (s *Server) registerImageRoutes(mux *http.ServeMux) {}
