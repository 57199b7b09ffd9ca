package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
)

// The server's admin API (api/snapshot.go lists the routes): served on
// Config.HTTP (`blockd server --http ADDR`), and mounted by `blockd serve`
// on its master's API listener. With Config.TLS it is HTTPS and requires
// a client certificate of the cluster CA, like the master's API.

// HTTPHandler is the server's admin API: every route lives under
// /v1/server/ so that `blockd serve` can mount it beside the master's
// routes on one listener. Errors are one-line JSON api.Error bodies.
func (s *Server) HTTPHandler() http.Handler {
	mux := http.NewServeMux()
	s.registerSnapshotRoutes(mux)
	s.registerImageRoutes(mux)
	mux.HandleFunc("/v1/server/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, api.Errorf(api.CodeNotFound, "no such endpoint: %s %s", r.Method, r.URL.Path))
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				s.log.Error("server_api_panic", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(p))
				writeError(w, api.Errorf(api.CodeInternal, "internal error"))
			}
		}()
		mux.ServeHTTP(w, r)
	})
}

// startHTTP listens on Config.HTTP (nothing when empty).
func (s *Server) startHTTP() error {
	if s.cfg.HTTP == "" {
		return nil
	}
	ln, err := net.Listen("tcp", s.cfg.HTTP)
	if err != nil {
		return fmt.Errorf("server: HTTP listener: %w", err)
	}
	if s.cfg.TLS != nil {
		ln = tls.NewListener(ln, s.cfg.TLS.ServerConfig(nil))
	}
	s.httpLn = ln
	s.httpSrv = &http.Server{Handler: s.HTTPHandler(), ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.httpSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("server_api_stopped", "addr", ln.Addr().String(), "err", err)
		}
	}()
	return nil
}

// stopHTTP stops the admin API, letting running requests finish briefly.
func (s *Server) stopHTTP() {
	if s.httpSrv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.httpSrv.Shutdown(ctx); err != nil {
		_ = s.httpSrv.Close()
	}
}

// HTTPAddr is the admin API address reported to the master ("" without one).
func (s *Server) HTTPAddr() string {
	if s.cfg.AdvertiseHTTP != "" {
		return s.cfg.AdvertiseHTTP
	}
	if s.httpLn != nil {
		return s.httpLn.Addr().String()
	}
	return ""
}

const maxAPIBody = 1 << 20

// decodeBody reads a small JSON body into v.
func decodeBody(r *http.Request, v any) *api.Error {
	data, err := io.ReadAll(io.LimitReader(r.Body, maxAPIBody+1))
	if err != nil {
		return api.Errorf(api.CodeBadRequest, "read body: %v", err)
	}
	if len(data) > maxAPIBody {
		return api.Errorf(api.CodeBadRequest, "body larger than %d bytes", maxAPIBody)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return api.Errorf(api.CodeBadRequest, "invalid JSON body: %v", err)
	}
	return nil
}

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
	e.Message = strings.Join(strings.Fields(e.Message), " ")
	writeJSON(w, st, e)
}

// primaryFor returns the volume's Primary while this server holds its
// authority (role, persisted epoch, live lease), or the error to answer:
// not_found when the volume is not hosted here, not_primary (409, naming
// the primary this server last heard of) otherwise.
func (s *Server) primaryFor(name string) (*hosted, *replication.Primary, *api.Error) {
	s.mu.Lock()
	h := s.vols[name]
	s.mu.Unlock()
	if h == nil {
		return nil, nil, api.Errorf(api.CodeNotFound, "volume %s is not hosted on this server (%s)", api.QuoteName(name), s.cfg.ServerID)
	}
	h.mu.Lock()
	ref := h.primary
	h.mu.Unlock()
	var e *api.Error
	p, ok := s.host.Primary(name)
	if !ok {
		e = api.Errorf(api.CodeNotPrimary, "%v", h.notPrimary(ref))
	} else if err := p.CheckAuthority(); err != nil {
		e = api.Errorf(api.CodeNotPrimary, "volume %s: this server (%s) cannot act as its primary now: %v", name, s.cfg.ServerID, err)
	} else {
		return h, p, nil
	}
	if ref.ServerID != "" {
		e.Primary = &ref
	}
	return h, nil, e
}
