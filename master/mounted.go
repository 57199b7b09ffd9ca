package master

import (
	"net/http"
	"sync/atomic"

	"github.com/blockd/blockd/api"
)

// mountedAPI serves /v1/server/ with the handler of the volume server that
// runs in the same process (blockd serve mounts its server's admin API on
// the master's listener, so the one API address serves both). Until one is
// mounted, and in a master of its own, those paths answer 404 naming why.
type mountedAPI struct{ h atomic.Pointer[http.Handler] }

func (a *mountedAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if h := a.h.Load(); h != nil {
		(*h).ServeHTTP(w, r)
		return
	}
	writeErr(w, api.Errorf(api.CodeNotFound, "no volume server API here: %s %s is served by a volume server's --http address (the master's volume primary answer names it as http_addr)", r.Method, r.URL.Path))
}

// MountServerAPI serves h under /v1/server/ on the master's API listener
// (with its TLS and client certificate checks). h sees the whole path.
func (m *Master) MountServerAPI(h http.Handler) { m.mounted.h.Store(&h) }
